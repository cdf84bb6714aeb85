//! Storage dtypes. Every tensor is stored as f32, f16 or bf16; kernels always
//! compute in f32 and only the load/store helpers differ (see `gpu::shader`).

use half::{bf16, f16};

/// How a tensor's elements are stored in its GPU buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Bytes a buffer needs for `numel` elements: 16-bit dtypes pack two per
    /// u32 word, and every buffer is a whole number of 16-byte rows so vec4
    /// loads at the tail stay inside the allocation.
    pub fn buffer_bytes(self, numel: usize) -> u64 {
        let raw = (numel * self.size_bytes()) as u64;
        raw.div_ceil(16).max(1) * 16
    }

    /// Byte offset and size of a binding over elements [first, first + numel)
    /// of a buffer. The end is padded like [`DType::buffer_bytes`], so a window
    /// that ends where its storage ends covers the same tail.
    pub fn window_bytes(self, first: usize, numel: usize) -> (u64, u64) {
        let offset = (first * self.size_bytes()) as u64;
        (offset, self.buffer_bytes(first + numel) - offset)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" | "fp32" | "float32" => Some(DType::F32),
            "f16" | "fp16" | "float16" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Encode f32 values into this dtype's byte layout (round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => bytemuck::cast_slice(values).to_vec(),
            DType::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            DType::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }

    /// Decode `numel` elements of this dtype's byte layout into f32.
    pub fn decode(self, bytes: &[u8], numel: usize) -> Vec<f32> {
        match self {
            DType::F32 => bytemuck::cast_slice(&bytes[..numel * 4]).to_vec(),
            DType::F16 => bytes[..numel * 2]
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes[..numel * 2]
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// Round an f32 through this storage dtype (what a store then load gives).
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::BF16 => bf16::from_f32(v).to_f32(),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let v = [0.0f32, 1.0, -2.5, 3.140625, 65504.0, 1e-3];
        for dt in DType::ALL {
            let back = dt.decode(&dt.encode(&v), v.len());
            for (a, b) in v.iter().zip(&back) {
                assert_eq!(dt.round(*a), *b, "{dt}: {a}");
            }
        }
    }

    #[test]
    fn buffer_bytes_pads_to_16() {
        assert_eq!(DType::F16.buffer_bytes(3), 16);
        assert_eq!(DType::F32.buffer_bytes(5), 32);
        assert_eq!(DType::BF16.buffer_bytes(0), 16);
    }

    #[test]
    fn window_bytes_pad_the_end() {
        assert_eq!(DType::F32.window_bytes(0, 5), (0, 32));
        assert_eq!(DType::F32.window_bytes(64, 7), (256, 32));
        // 16-bit: two elements per word.
        assert_eq!(DType::F16.window_bytes(128, 3), (256, 16));
    }
}
