//! GGUF, llama.cpp's model file (versions 2 and 3, little-endian): the header, the metadata
//! key/value pairs (every value type, arrays included), the tensor table, and dequantisation of
//! F32, F16, BF16, Q8_0, Q4_0 and Q4_1 to f32 exactly as GGML defines them. The file is
//! memory-mapped; tensors are decoded one at a time. [`import`] turns a LLaMA GGUF into a
//! Hugging Face model directory.
//!
//! Layout: `"GGUF"`, u32 version, u64 tensor count, u64 metadata count, the metadata
//! (string key, u32 value type, value), the tensor infos (name, u32 n_dims, u64 dims innermost
//! first, u32 GGML type, u64 offset), padding to `general.alignment` (default 32), then the tensor
//! data, each tensor at its offset from the start of that data section.
mod dequant;
pub mod import;
mod tokenizer;

pub use dequant::{dequantize, QK};

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Floats and integers.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type (for error messages).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }
}

/// A GGML tensor type, by its number in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

/// Name, elements per block and bytes per block of every GGML type (ggml.h's `ggml_type`), so
/// that sizes can be checked even for tensors this reader cannot decode.
const GGML_TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    fn entry(self) -> Option<&'static (u32, &'static str, usize, usize)> {
        GGML_TYPES.iter().find(|e| e.0 == self.0)
    }

    /// `Q4_1`, or `type 99` for a number GGML does not define.
    pub fn name(self) -> String {
        self.entry().map_or_else(|| format!("type {}", self.0), |e| e.1.to_string())
    }

    /// (elements, bytes) of one block, for known types.
    pub fn block(self) -> Option<(usize, usize)> {
        self.entry().map(|e| (e.2, e.3))
    }

    /// Whether [`dequantize`] decodes this type.
    pub fn is_supported(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16 | Self::Q8_0 | Self::Q4_0 | Self::Q4_1)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (contiguous) dimension, the number of columns.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape as PyTorch/safetensors write it: outermost first (`[rows, columns]`).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Bytes of the tensor's data, for known types.
    pub fn n_bytes(&self) -> Option<u64> {
        let (block, bytes) = self.ggml_type.block()?;
        Some(self.n_elements() / block as u64 * bytes as u64)
    }
}

/// An opened GGUF file: its metadata and tensor table, with the data memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// In file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the tensor data starts in the file.
    pub data_start: u64,
    map: memmap2::Mmap,
}

/// Reads little-endian values from the file, naming the file and what was being read when the
/// bytes run out.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    origin: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            bail!(
                "{}: truncated GGUF: {} needs {n} bytes at offset {}, but the file ends after {} bytes",
                self.origin,
                what(),
                self.pos,
                self.bytes.len()
            );
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow::anyhow!("{}: {} is not valid UTF-8", self.origin, what()))
    }

    fn value(&mut self, ty: u32, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{}: {} is a bool stored as {b} (must be 0 or 1)", self.origin, what()),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count beyond what is left is corrupt,
                // and must not become a huge allocation.
                let left = (self.bytes.len() - self.pos) as u64;
                if n > left {
                    bail!(
                        "{}: truncated GGUF: {} claims {n} elements but only {left} bytes remain",
                        self.origin,
                        what()
                    );
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => bail!("{}: {} has unknown value type {other}", self.origin, what()),
        })
    }
}

/// What the header holds before the tensor data.
struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    /// Bytes of header, metadata and tensor table.
    len: u64,
}

fn parse_header(bytes: &[u8], origin: &str) -> Result<Header> {
    let mut c = Cursor { bytes, pos: 0, origin };
    let magic = c.array::<4>(&|| "the magic".into())?;
    if &magic != MAGIC {
        bail!("{origin}: not a GGUF file (magic {:?}, expected \"GGUF\")", String::from_utf8_lossy(&magic));
    }
    let version = c.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => bail!("{origin}: GGUF version 1 is not supported (re-convert with a current llama.cpp)"),
        v if v.swap_bytes() <= 3 => {
            bail!("{origin}: a big-endian GGUF (version {}); only little-endian files are supported", v.swap_bytes())
        }
        v => bail!("{origin}: unknown GGUF version {v} (versions 2 and 3 are supported)"),
    }
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    let n_kv = c.u64(&|| "the metadata count".into())?;
    let mut metadata = Vec::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let what = || format!("metadata `{key}`");
        let ty = c.u32(&what)?;
        let value = c.value(ty, &what)?;
        metadata.push((key, value));
    }
    let mut tensors = Vec::new();
    for i in 0..n_tensors {
        let name = c.string(&|| format!("the name of tensor #{i}"))?;
        let what = || format!("tensor info `{name}`");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("{origin}: tensor `{name}` has {n_dims} dimensions (GGML allows 1 to {MAX_DIMS})");
        }
        let dims = (0..n_dims).map(|_| c.u64(&what)).collect::<Result<Vec<u64>>>()?;
        let ggml_type = GgmlType(c.u32(&what)?);
        let offset = c.u64(&what)?;
        tensors.push(TensorInfo { name, dims, ggml_type, offset });
    }
    Ok(Header { version, metadata, tensors, len: c.pos as u64 })
}

impl GgufFile {
    /// Opens and checks a GGUF file: header, metadata, tensor table, and that every tensor's
    /// data lies inside the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let origin = path.display().to_string();
        let file = std::fs::File::open(path).with_context(|| format!("opening {origin}"))?;
        let len = file.metadata().with_context(|| format!("reading {origin}"))?.len();
        if len < 4 {
            bail!("{origin}: not a GGUF file ({len} bytes, too short for the header)");
        }
        // SAFETY: the file is only read; a concurrent writer would be a misuse we cannot prevent.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {origin}"))?;
        let h = parse_header(&map, &origin)?;
        let mut g = GgufFile {
            path: path.to_path_buf(),
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            alignment: DEFAULT_ALIGNMENT,
            data_start: 0,
            map,
        };
        g.alignment = match g.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => bail!("{origin}: metadata `general.alignment` must be a power of two, found {v:?}"),
            },
        };
        g.data_start = h.len.div_ceil(g.alignment) * g.alignment;
        g.check_tensors()?;
        Ok(g)
    }

    /// Every tensor: a sane shape, an aligned offset, and data inside the file.
    fn check_tensors(&self) -> Result<()> {
        let origin = self.path.display();
        let len = self.map.len() as u64;
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                bail!("{origin}: tensor `{}` appears twice", t.name);
            }
            let n = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).filter(|&n| n > 0);
            let Some(n) = n else { bail!("{origin}: tensor `{}` has dimensions {:?}", t.name, t.dims) };
            if t.offset % self.alignment != 0 {
                bail!(
                    "{origin}: tensor `{}` starts at offset {}, not a multiple of the alignment {}",
                    t.name,
                    t.offset,
                    self.alignment
                );
            }
            let start = self.data_start.checked_add(t.offset);
            match (t.ggml_type.block(), start) {
                (Some((block, bytes)), Some(start)) => {
                    if t.dims[0] % block as u64 != 0 {
                        bail!("{origin}: tensor `{}` ({}) has rows of {} elements, not a multiple of the block size {block}", t.name, t.ggml_type, t.dims[0]);
                    }
                    let size = n / block as u64 * bytes as u64;
                    if start.checked_add(size).is_none_or(|end| end > len) {
                        bail!(
                            "{origin}: truncated GGUF: tensor `{}` ({}, {size} bytes at offset {start}) runs past the end of the file ({len} bytes)",
                            t.name,
                            t.ggml_type
                        );
                    }
                }
                (_, start) => {
                    if start.is_none_or(|s| s > len) {
                        bail!(
                            "{origin}: truncated GGUF: tensor `{}` starts past the end of the file ({len} bytes)",
                            t.name
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (known types only; [`GgufFile::open`] checked they fit).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let size = t.n_bytes().with_context(|| {
            format!("{}: tensor `{}` has unknown type {}", self.path.display(), t.name, t.ggml_type)
        })?;
        let start = (self.data_start + t.offset) as usize;
        Ok(&self.map[start..start + size as usize])
    }

    /// A tensor decoded to f32, in file order (row-major over [`TensorInfo::shape`]).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        if !t.ggml_type.is_supported() {
            bail!(
                "{}: tensor `{}` has type {}; import-gguf decodes F32, F16, BF16, Q8_0, Q4_0 and Q4_1 (re-quantize the model to one of these)",
                self.path.display(),
                t.name,
                t.ggml_type
            );
        }
        let bytes = self.tensor_bytes(t)?;
        dequantize(t.ggml_type, bytes, t.n_elements() as usize)
            .with_context(|| format!("{}: tensor `{}`", self.path.display(), t.name))
    }
}
