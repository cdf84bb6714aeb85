//! WGSL sources and their specialization.
//!
//! A file in `shaders/` holds an op family. Its top part (before the first
//! `//@ entry`) has helpers shared by every entry; then each entry point has a
//! section that starts with a header:
//!
//! ```text
//! //@ entry matmul_forward
//! //@ tensors a:read b:read c:write
//! //@ const TM = 4u
//! ```
//!
//! A `//@ helpers NAME` block holds functions several entries share (they may
//! use those entries' tensors); an entry includes it with `//@ use NAME`.
//!
//! A pipeline is built from the shared part plus one section, behind a
//! generated prelude: the section's consts (defaults from the header,
//! overridden per pipeline), `var<uniform> p: Params` when the section
//! declares `struct Params`, and for each tensor a binding with
//! `NAME_load(i) -> f32`, `NAME_load4(i) -> vec4<f32>`, and for written tensors
//! `NAME_store(i, v)` and `NAME_store4(i, v)`, specialized to the tensor's
//! storage dtype. Kernels compute in f32 whatever the storage.

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::fmt::Write;
use std::sync::OnceLock;

/// Every shader file, by name (the file stem).
pub static SOURCES: &[(&str, &str)] = &[
    (
        "elementwise",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("loss", include_str!("../../shaders/loss.wgsl")),
    ("optim", include_str!("../../shaders/optim.wgsl")),
    ("concat", include_str!("../../shaders/concat.wgsl")),
    ("upsample", include_str!("../../shaders/upsample.wgsl")),
    ("transpose", include_str!("../../shaders/transpose.wgsl")),
    ("embedding", include_str!("../../shaders/embedding.wgsl")),
    ("group_norm", include_str!("../../shaders/group_norm.wgsl")),
    ("softmax", include_str!("../../shaders/softmax.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    ("conv2d", include_str!("../../shaders/conv2d.wgsl")),
    ("diffusion", include_str!("../../shaders/diffusion.wgsl")),
];

/// How a kernel uses a tensor binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    /// Read through 16-byte vectors (`NAME:read4`): `NAME_load4(i)` only at
    /// multiples of 4, one vector load instead of four scalar ones.
    ReadVec4,
    Write,
    /// Written (and read) through 16-byte vectors (`NAME:write4`,
    /// `NAME:rw4`): `NAME_store4(i, v)` only at multiples of 4 is one vector
    /// store. On CPU adapters (llvmpipe) every storage access instruction
    /// is a loop over the SIMD lanes: a vector access costs about 2.3 times a
    /// scalar one for 4 elements. Packed 16-bit storage keeps its word-wise
    /// (atomic) helpers.
    WriteVec4,
    ReadWrite,
    ReadWriteVec4,
}

impl Access {
    pub fn writes(self) -> bool {
        !matches!(self, Access::Read | Access::ReadVec4)
    }

    fn vec4(self) -> bool {
        matches!(
            self,
            Access::ReadVec4 | Access::WriteVec4 | Access::ReadWriteVec4
        )
    }
}

/// How a tensor's elements are laid out in the WGSL buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    F32,
    /// `array<f16>`, needs the adapter's SHADER_F16.
    F16Native,
    /// Two f16 per u32 through pack2x16float/unpack2x16float: works everywhere.
    F16Packed,
    /// Two bf16 per u32 (the high halves of f32s).
    BF16Packed,
}

impl Storage {
    /// The storage for `dtype`: native f16 where the adapter has it, unless
    /// `force_packed` (used by tests to cover both paths on one adapter).
    pub fn for_dtype(dtype: DType, shader_f16: bool, force_packed: bool) -> Storage {
        match dtype {
            DType::F32 => Storage::F32,
            DType::F16 if shader_f16 && !force_packed => Storage::F16Native,
            DType::F16 => Storage::F16Packed,
            DType::BF16 => Storage::BF16Packed,
        }
    }
}

/// One entry section of a shader file.
#[derive(Clone, Debug)]
pub struct EntryInfo {
    pub entry: String,
    pub tensors: Vec<(String, Access)>,
    pub consts: Vec<(String, String)>,
    pub has_params: bool,
    /// Helper blocks (`//@ use NAME`) placed before the body.
    pub uses: Vec<String>,
    /// Byte range of the section body in the file.
    body: std::ops::Range<usize>,
}

/// A parsed shader file.
#[derive(Clone, Debug)]
pub struct ShaderFile {
    pub name: String,
    pub source: &'static str,
    /// Byte length of the shared top part.
    common_len: usize,
    pub entries: Vec<EntryInfo>,
    /// `//@ helpers NAME` blocks: code shared by the entries that `//@ use` it
    /// (it may reference their tensors, unlike the shared top part).
    helpers: Vec<(String, std::ops::Range<usize>)>,
}

fn shader_err(name: &str, msg: impl Into<String>) -> Error {
    Error::Shader {
        shader: name.to_string(),
        msg: msg.into(),
    }
}

impl ShaderFile {
    pub fn parse(name: &str, source: &'static str) -> Result<ShaderFile> {
        let mut entries: Vec<EntryInfo> = Vec::new();
        let mut helpers: Vec<(String, std::ops::Range<usize>)> = Vec::new();
        let mut common_len = source.len();
        let mut offset = 0;
        // Which kind of section is open: an entry's body or a helper block's.
        let mut in_helpers = false;
        for line in source.split_inclusive('\n') {
            let start = offset;
            offset += line.len();
            let Some(rest) = line.trim().strip_prefix("//@") else {
                continue;
            };
            let rest = rest.trim();
            let (kw, args) = rest.split_once(' ').unwrap_or((rest, ""));
            match kw {
                "entry" | "helpers" => {
                    common_len = common_len.min(start);
                    if in_helpers {
                        if let Some(h) = helpers.last_mut() {
                            h.1.end = start;
                        }
                    } else if let Some(prev) = entries.last_mut() {
                        prev.body.end = start;
                    }
                    in_helpers = kw == "helpers";
                    if in_helpers {
                        helpers.push((args.trim().to_string(), offset..source.len()));
                    } else {
                        entries.push(EntryInfo {
                            entry: args.trim().to_string(),
                            tensors: Vec::new(),
                            consts: Vec::new(),
                            has_params: false,
                            uses: Vec::new(),
                            body: offset..source.len(),
                        });
                    }
                }
                "use" => {
                    let cur = entries
                        .last_mut()
                        .filter(|_| !in_helpers)
                        .ok_or_else(|| shader_err(name, "'//@ use' outside an entry section"))?;
                    cur.uses.push(args.trim().to_string());
                }
                "tensors" | "const" => {
                    let cur = entries.last_mut().filter(|_| !in_helpers).ok_or_else(|| {
                        shader_err(name, format!("'//@ {kw}' outside an entry section"))
                    })?;
                    if kw == "tensors" {
                        for t in args.split_whitespace() {
                            let (n, a) = t.split_once(':').ok_or_else(|| {
                                shader_err(
                                    name,
                                    format!("tensor '{t}' needs ':' and read, write, rw, read4, write4 or rw4"),
                                )
                            })?;
                            let access = match a {
                                "read" => Access::Read,
                                "read4" => Access::ReadVec4,
                                "write" => Access::Write,
                                "write4" => Access::WriteVec4,
                                "rw" => Access::ReadWrite,
                                "rw4" => Access::ReadWriteVec4,
                                _ => {
                                    return Err(shader_err(
                                        name,
                                        format!("tensor '{t}': unknown access '{a}'"),
                                    ))
                                }
                            };
                            cur.tensors.push((n.to_string(), access));
                        }
                    } else {
                        let (n, v) = args.split_once('=').ok_or_else(|| {
                            shader_err(name, format!("'//@ const {args}' needs NAME = VALUE"))
                        })?;
                        cur.consts
                            .push((n.trim().to_string(), v.trim().to_string()));
                    }
                }
                _ => return Err(shader_err(name, format!("unknown directive '//@ {kw}'"))),
            }
        }
        for e in &mut entries {
            for u in &e.uses {
                if !helpers.iter().any(|(n, _)| n == u) {
                    return Err(shader_err(
                        name,
                        format!("{}: no '//@ helpers {u}' block", e.entry),
                    ));
                }
            }
            let used = helpers.iter().filter(|(n, _)| e.uses.contains(n));
            e.has_params = std::iter::once(e.body.clone())
                .chain(used.map(|(_, r)| r.clone()))
                .any(|r| source[r].contains("struct Params"));
        }
        Ok(ShaderFile {
            name: name.to_string(),
            source,
            common_len,
            entries,
            helpers,
        })
    }

    /// The shader file `name` from [`SOURCES`].
    /// Files are parsed once per process (a model has thousands of kernels).
    pub fn get(name: &str) -> Result<&'static ShaderFile> {
        static PARSED: OnceLock<Vec<Result<ShaderFile>>> = OnceLock::new();
        let parsed = PARSED.get_or_init(|| {
            SOURCES
                .iter()
                .map(|(n, src)| ShaderFile::parse(n, src))
                .collect()
        });
        let i = SOURCES
            .iter()
            .position(|(n, _)| *n == name)
            .ok_or_else(|| shader_err(name, "no such shader file"))?;
        parsed[i].as_ref().map_err(|e| match e {
            Error::Shader { msg, .. } => shader_err(name, msg.clone()),
            other => shader_err(name, other.to_string()),
        })
    }

    pub fn entry(&self, entry: &str) -> Result<&EntryInfo> {
        self.entries
            .iter()
            .find(|e| e.entry == entry)
            .ok_or_else(|| shader_err(&self.name, format!("no entry point '{entry}'")))
    }

    /// The full WGSL module for one entry with the given storages (one per
    /// header tensor, in header order) and const overrides.
    pub fn specialize(
        &self,
        entry: &str,
        storages: &[Storage],
        consts: &[(&str, String)],
    ) -> Result<String> {
        let info = self.entry(entry)?;
        if storages.len() != info.tensors.len() {
            return Err(shader_err(
                &self.name,
                format!(
                    "{entry}: {} storages given for tensors {:?}",
                    storages.len(),
                    info.tensors.iter().map(|t| &t.0).collect::<Vec<_>>()
                ),
            ));
        }
        for (k, _) in consts {
            if !info.consts.iter().any(|(n, _)| n == k) {
                return Err(shader_err(
                    &self.name,
                    format!("{entry}: no const named '{k}'"),
                ));
            }
        }
        let mut out = String::new();
        if storages.contains(&Storage::F16Native) {
            out.push_str("enable f16;\n");
        }
        for (n, default) in &info.consts {
            let v = consts
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
                .unwrap_or(default);
            let _ = writeln!(out, "const {n} = {v};");
        }
        out.push_str(PRELUDE);
        if info.has_params {
            out.push_str("@group(0) @binding(0) var<uniform> p: Params;\n");
        }
        for (i, ((name, access), storage)) in info.tensors.iter().zip(storages).enumerate() {
            tensor_binding(&mut out, i as u32 + 1, name, *access, *storage);
        }
        out.push_str(&self.source[..self.common_len]);
        for u in &info.uses {
            if let Some((_, range)) = self.helpers.iter().find(|(n, _)| n == u) {
                out.push_str(&self.source[range.clone()]);
            }
        }
        out.push_str(&self.source[info.body.clone()]);
        Ok(out)
    }
}

/// Helpers every kernel may use.
const PRELUDE: &str = r#"
// Flat invocation index of a 1-D launch spread over a 2-D grid
// (dispatch dimensions are limited to 65535 workgroups).
fn flat_id(gid: vec3<u32>, nwg: vec3<u32>, wg_size: u32) -> u32 {
    return gid.x + gid.y * nwg.x * wg_size;
}
// bf16 <-> f32: bf16 is the high half of an f32, rounded to nearest even.
fn bf16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x7fffffffu) > 0x7f800000u) { return 0x7fc0u; }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}
fn bf16_value(h: u32) -> f32 { return bitcast<f32>(h << 16u); }
// (sin x, cos x) to about 1e-7 on every backend. The built-ins need only be
// within 2^-11 of the truth on [-pi, pi] (SwiftShader's are 2e-4 off, which
// moved a training loss by 1e-4 between browser and native), and timestep
// phases reach ~1000 rad. Cody-Waite reduction by pi/2: PIO2_1 and PIO2_2
// have 12 significant bits, so k * PIO2_{1,2} is exact for |k| < 4096
// (|x| < ~6400); PIO2_3 is the rest of pi/2. Then Taylor polynomials on
// [-pi/4, pi/4] (truncation below 2e-9).
const PIO2_1: f32 = 1.5703125;
const PIO2_2: f32 = 4.837512969970703e-4;
const PIO2_3: f32 = 7.549790126404332e-8;
fn sincos(x: f32) -> vec2<f32> {
    let k = round(x * 0.6366197723675814);
    let r = ((x - k * PIO2_1) - k * PIO2_2) - k * PIO2_3;
    let r2 = r * r;
    let s = r * (1.0 + r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362880.0)))));
    let c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24.0 + r2 * (-1.0 / 720.0 + r2 * (1.0 / 40320.0 + r2 * (-1.0 / 3628800.0)))));
    switch (i32(k) & 3) {
        case 0: { return vec2<f32>(s, c); }
        case 1: { return vec2<f32>(c, -s); }
        case 2: { return vec2<f32>(-s, -c); }
        default: { return vec2<f32>(-c, s); }
    }
}
"#;

/// Emit the binding of one tensor and its load/store helpers.
fn tensor_binding(out: &mut String, binding: u32, name: &str, access: Access, storage: Storage) {
    let write = access.writes();
    let packed = matches!(storage, Storage::F16Packed | Storage::BF16Packed);
    if access.vec4() && !(write && packed) {
        return vec4_binding(out, binding, name, storage, write);
    }
    let space = if write { "read_write" } else { "read" };
    let elem = match storage {
        Storage::F32 => "f32",
        Storage::F16Native => "f16",
        Storage::F16Packed | Storage::BF16Packed if write => "atomic<u32>",
        Storage::F16Packed | Storage::BF16Packed => "u32",
    };
    let _ = writeln!(
        out,
        "@group(0) @binding({binding}) var<storage, {space}> {name}_buf: array<{elem}>;"
    );
    // The u32 word `w` of a packed buffer.
    let word = |w: &str| {
        if write {
            format!("atomicLoad(&{name}_buf[{w}])")
        } else {
            format!("{name}_buf[{w}]")
        }
    };
    // Unpack the two values of a word, and pack two values into a word.
    let (unpack, pack) = match storage {
        Storage::BF16Packed => (
            "vec2<f32>(bf16_value(W & 0xffffu), bf16_value(W >> 16u))",
            "(bf16_bits(V.x) | (bf16_bits(V.y) << 16u))",
        ),
        _ => ("unpack2x16float(W)", "pack2x16float(V)"),
    };
    match storage {
        Storage::F32 | Storage::F16Native => {
            let _ = writeln!(
                out,
                "fn {name}_load(i: u32) -> f32 {{ return f32({name}_buf[i]); }}\n\
                 fn {name}_load4(i: u32) -> vec4<f32> {{ return vec4<f32>(f32({name}_buf[i]), f32({name}_buf[i + 1u]), f32({name}_buf[i + 2u]), f32({name}_buf[i + 3u])); }}"
            );
            if write {
                let _ = writeln!(
                    out,
                    "fn {name}_store(i: u32, v: f32) {{ {name}_buf[i] = {elem}(v); }}\n\
                     fn {name}_store4(i: u32, v: vec4<f32>) {{ {name}_buf[i] = {elem}(v.x); {name}_buf[i + 1u] = {elem}(v.y); {name}_buf[i + 2u] = {elem}(v.z); {name}_buf[i + 3u] = {elem}(v.w); }}"
                );
            }
        }
        _ => {
            let up = |w: &str| unpack.replace('W', &word(w));
            let _ = writeln!(
                out,
                "fn {name}_load(i: u32) -> f32 {{ return {}[i & 1u]; }}",
                up("i >> 1u")
            );
            let _ = writeln!(
                out,
                "fn {name}_load4(i: u32) -> vec4<f32> {{\n\
                 \x20   if ((i & 1u) == 0u) {{ return vec4<f32>({}, {}); }}\n\
                 \x20   return vec4<f32>({name}_load(i), {name}_load(i + 1u), {name}_load(i + 2u), {name}_load(i + 3u));\n}}",
                up("i >> 1u"),
                up("(i >> 1u) + 1u")
            );
            if write {
                // A lone 16-bit store shares its word with a neighbour that another
                // invocation may own: clear and set only our half, atomically.
                // Integer atomics are exact, so results stay deterministic.
                let half = pack.replace('V', "vec2<f32>(v, 0.0)");
                let pair = |v: &str| pack.replace('V', v);
                let _ = writeln!(
                    out,
                    "fn {name}_store(i: u32, v: f32) {{\n\
                     \x20   let shift = (i & 1u) * 16u;\n\
                     \x20   let bits = ({half} & 0xffffu) << shift;\n\
                     \x20   atomicAnd(&{name}_buf[i >> 1u], ~(0xffffu << shift));\n\
                     \x20   atomicOr(&{name}_buf[i >> 1u], bits);\n}}\n\
                     fn {name}_store4(i: u32, v: vec4<f32>) {{\n\
                     \x20   if ((i & 1u) == 0u) {{\n\
                     \x20       atomicStore(&{name}_buf[i >> 1u], {});\n\
                     \x20       atomicStore(&{name}_buf[(i >> 1u) + 1u], {});\n\
                     \x20       return;\n\
                     \x20   }}\n\
                     \x20   {name}_store(i, v.x); {name}_store(i + 1u, v.y); {name}_store(i + 2u, v.z); {name}_store(i + 3u, v.w);\n}}",
                    pair("v.xy"),
                    pair("v.zw")
                );
            }
        }
    }
}

/// A tensor viewed as 16-byte vectors (see [`Access::ReadVec4`] and
/// [`Access::WriteVec4`]; written packed 16-bit storage is not viewed so).
fn vec4_binding(out: &mut String, binding: u32, name: &str, storage: Storage, write: bool) {
    let (elem, load4, load) = match storage {
        Storage::F32 => ("vec4<f32>", "B[i >> 2u]", "B[i >> 2u][i & 3u]"),
        Storage::F16Native => (
            "vec4<f16>",
            "vec4<f32>(B[i >> 2u])",
            "f32(B[i >> 2u][i & 3u])",
        ),
        Storage::F16Packed => (
            "vec2<u32>",
            "vec4<f32>(unpack2x16float(B[i >> 2u].x), unpack2x16float(B[i >> 2u].y))",
            "unpack2x16float(B[i >> 2u][(i >> 1u) & 1u])[i & 1u]",
        ),
        Storage::BF16Packed => (
            "vec2<u32>",
            "vec4<f32>(bf16_value(B[i >> 2u].x & 0xffffu), bf16_value(B[i >> 2u].x >> 16u), \
             bf16_value(B[i >> 2u].y & 0xffffu), bf16_value(B[i >> 2u].y >> 16u))",
            "bf16_value((B[i >> 2u][(i >> 1u) & 1u] >> ((i & 1u) * 16u)) & 0xffffu)",
        ),
    };
    let buf = format!("{name}_buf");
    let space = if write { "read_write" } else { "read" };
    let _ = writeln!(
        out,
        "@group(0) @binding({binding}) var<storage, {space}> {buf}: array<{elem}>;\n\
         fn {name}_load4(i: u32) -> vec4<f32> {{ return {}; }}\n\
         fn {name}_load(i: u32) -> f32 {{ return {}; }}",
        load4.replace('B', &buf),
        load.replace('B', &buf)
    );
    if write {
        let elem4 = if storage == Storage::F16Native {
            "f16"
        } else {
            "f32"
        };
        let _ = writeln!(
            out,
            "fn {name}_store4(i: u32, v: vec4<f32>) {{ {buf}[i >> 2u] = vec4<{elem4}>(v); }}\n\
             fn {name}_store(i: u32, v: f32) {{ {buf}[i >> 2u][i & 3u] = {elem4}(v); }}"
        );
    }
}
