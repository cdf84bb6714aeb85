//! Adapter selection: the best adapter by default, or one chosen by backend
//! and by a substring of its name (CLI flags or the DIFFTRAIN_BACKEND /
//! DIFFTRAIN_ADAPTER environment variables).

use crate::error::{Error, Result};

/// Which adapter to use. Empty fields mean "the best one".
#[derive(Clone, Debug, Default)]
pub struct AdapterChoice {
    /// "vulkan", "metal", "dx12", "gl", "webgpu"; several separated by commas.
    pub backend: Option<String>,
    /// Case-insensitive substring of the adapter name, e.g. "llvmpipe", "nvidia".
    pub name: Option<String>,
    /// Ask for timestamp queries (per-dispatch profiles). Off by default:
    /// on lavapipe merely enabling them slows every dispatch (a 3x3 conv
    /// took 22 ms instead of 16).
    pub timestamps: bool,
}

impl AdapterChoice {
    /// The choice from DIFFTRAIN_BACKEND and DIFFTRAIN_ADAPTER.
    pub fn from_env() -> AdapterChoice {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        AdapterChoice {
            backend: var("DIFFTRAIN_BACKEND"),
            name: var("DIFFTRAIN_ADAPTER"),
            timestamps: false,
        }
    }

    /// Fields given here win over the environment.
    pub fn or_env(self) -> AdapterChoice {
        let env = AdapterChoice::from_env();
        AdapterChoice {
            backend: self.backend.or(env.backend),
            name: self.name.or(env.name),
            timestamps: self.timestamps,
        }
    }

    fn backends(&self) -> Result<wgpu::Backends> {
        // GL only when asked: it has neither f16 nor subgroups, and probing it
        // prints loader noise on headless Linux.
        let Some(list) = &self.backend else {
            return Ok(wgpu::Backends::PRIMARY);
        };
        let mut out = wgpu::Backends::empty();
        for b in list.split(',').map(|s| s.trim().to_ascii_lowercase()) {
            out |= match b.as_str() {
                "vulkan" | "vk" => wgpu::Backends::VULKAN,
                "metal" | "mtl" => wgpu::Backends::METAL,
                "dx12" | "d3d12" => wgpu::Backends::DX12,
                "gl" | "gles" | "opengl" => wgpu::Backends::GL,
                "webgpu" | "browser" => wgpu::Backends::BROWSER_WEBGPU,
                other => {
                    return Err(Error::NoAdapter {
                        detail: format!(
                        " (unknown backend '{other}'; expected vulkan, metal, dx12, gl or webgpu)"
                    ),
                    })
                }
            };
        }
        Ok(out)
    }
}

/// One line per adapter, for `difftrain info` and error messages.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl AdapterReport {
    fn from_info(info: &wgpu::AdapterInfo) -> Self {
        AdapterReport {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
/// Ranks adapters: discrete GPU, integrated, virtual, CPU, other; on a tie
/// Vulkan/Metal/DX12/WebGPU before GL (GL has neither f16 nor subgroups).
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let backend = u8::from(info.backend == wgpu::Backend::Gl);
    (kind, backend)
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// All adapters the chosen backends expose, for `difftrain info`.
pub async fn list(choice: &AdapterChoice) -> Result<Vec<AdapterReport>> {
    let inst = instance(choice.backends()?);
    let adapters = inst.enumerate_adapters(choice.backends()?).await;
    Ok(adapters
        .iter()
        .map(|a| AdapterReport::from_info(&a.get_info()))
        .collect())
}

/// The adapter `choice` names, or the best one. The instance is returned too:
/// it must outlive the adapter on some backends.
pub(super) async fn select(choice: &AdapterChoice) -> Result<(wgpu::Adapter, wgpu::Instance)> {
    let backends = choice.backends()?;
    let inst = instance(backends);
    #[cfg(target_arch = "wasm32")]
    {
        // The browser exposes one adapter through requestAdapter.
        let adapter = inst
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter {
                detail: format!(" ({e})"),
            })?;
        Ok((adapter, inst))
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let mut adapters = inst.enumerate_adapters(backends).await;
        let seen: Vec<String> = adapters
            .iter()
            .map(|a| {
                let r = AdapterReport::from_info(&a.get_info());
                format!("{} ({})", r.name, r.backend)
            })
            .collect();
        if let Some(needle) = &choice.name {
            let needle = needle.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&needle));
        }
        adapters.sort_by_key(|a| rank(&a.get_info()));
        let detail = match (&choice.name, seen.is_empty()) {
            (_, true) => String::new(),
            (Some(n), false) => format!(" matching '{n}' among: {}", seen.join(", ")),
            (None, false) => String::new(),
        };
        let adapter = adapters
            .into_iter()
            .next()
            .ok_or(Error::NoAdapter { detail })?;
        Ok((adapter, inst))
    }
}
