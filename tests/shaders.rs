//! Every shader entry, specialized for every storage kind, must parse and
//! validate with naga and translate to SPIR-V (Vulkan), MSL (Metal) and HLSL
//! (DX12): a broken shader fails here with naga's diagnostic, and Metal/DX12
//! breakage shows although no Mac or Windows machine runs the tests.

use difftrain::gpu::shader::{ShaderFile, Storage, SOURCES};
use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

const STORAGES: [Storage; 4] = [
    Storage::F32,
    Storage::F16Native,
    Storage::F16Packed,
    Storage::BF16Packed,
];

fn check_backend(label: &str, module: &naga::Module, caps: Capabilities) -> Result<(), String> {
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(module)
        .map_err(|e| format!("{label}: validation: {}", e.emit_to_string("")))?;
    let spv_opts = spv::Options {
        lang_version: (1, 3),
        ..Default::default()
    };
    spv::write_vec(module, &info, &spv_opts, None).map_err(|e| format!("{label}: SPIR-V: {e}"))?;
    let msl_opts = msl::Options {
        lang_version: (2, 4),
        ..Default::default()
    };
    msl::write_string(module, &info, &msl_opts, &msl::PipelineOptions::default())
        .map_err(|e| format!("{label}: MSL: {e}"))?;
    let hlsl_opts = hlsl::Options {
        shader_model: hlsl::ShaderModel::V6_2,
        ..Default::default()
    };
    let mut out = String::new();
    hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl::PipelineOptions::default())
        .write(module, &info, None)
        .map_err(|e| format!("{label}: HLSL: {e}"))?;
    Ok(())
}

#[test]
fn every_shader_validates_and_translates_for_every_storage() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, source) in SOURCES {
        let file = ShaderFile::parse(name, source).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !file.entries.is_empty(),
            "{name}.wgsl has no '//@ entry' sections"
        );
        for entry in &file.entries {
            for storage in STORAGES {
                let storages = vec![storage; entry.tensors.len()];
                let label = format!("{name}.wgsl::{} [{storage:?}]", entry.entry);
                let wgsl = file.specialize(&entry.entry, &storages, &[]).unwrap();
                let module = match naga::front::wgsl::parse_str(&wgsl) {
                    Ok(m) => m,
                    Err(e) => {
                        failures.push(format!("{label}: parse: {}", e.emit_to_string(&wgsl)));
                        continue;
                    }
                };
                let caps = Capabilities::SHADER_FLOAT16
                    | Capabilities::SHADER_FLOAT16_IN_FLOAT32
                    | Capabilities::SUBGROUP;
                if let Err(e) = check_backend(&label, &module, caps) {
                    failures.push(e);
                }
                checked += 1;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} shader variants failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(checked > 0);
}

/// Chromium's WebGPU (Tint) does not zero a `var x: T;` declared in a loop
/// on every iteration, as WGSL says it is: the attention forward's score
/// accumulators kept the last key's sums and every output was wrong in the
/// browser. Every function-scope `var` therefore has an initializer.
#[test]
fn every_function_variable_has_an_initializer() {
    let mut bare = Vec::new();
    for (name, source) in SOURCES {
        for (n, line) in source.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let t = code.trim_start();
            let indented = code.len() > t.len();
            if indented && t.starts_with("var ") && t.ends_with(';') && !t.contains('=') {
                bare.push(format!("{name}.wgsl:{}: {}", n + 1, t));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "write `var x = T();` instead of `var x: T;`:\n{}",
        bare.join("\n")
    );
}

#[test]
fn header_errors_are_reported() {
    let bad = "//@ entry e\n//@ tensors x:sideways\n";
    let err = ShaderFile::parse("bad", bad).unwrap_err().to_string();
    assert!(err.contains("sideways"), "{err}");
    let file = ShaderFile::parse("ok", "//@ entry e\n//@ tensors x:read\n").unwrap();
    let err = file.specialize("e", &[], &[]).unwrap_err().to_string();
    assert!(err.contains("storages"), "{err}");
    let err = file
        .specialize("e", &[Storage::F32], &[("NOPE", "1u".into())])
        .unwrap_err()
        .to_string();
    assert!(err.contains("NOPE"), "{err}");
}
