//! GGUF files (versions 2 and 3), read and written.
//!
//! Layout (little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64;
//! the metadata as (key string, value type u32, value); one info per tensor (name, n_dims u32,
//! dims u64 × n_dims innermost first, ggml type u32, offset u64 into the data section); padding
//! to `general.alignment` (default 32); the tensor data. Strings are a u64 length and UTF-8.
//!
//! Every count and length is checked against the bytes that remain before anything is
//! allocated, so a corrupt or truncated file is an error, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llama_core::DType;
use memmap2::Mmap;

use crate::error::{ModelError, Result};
use crate::mmap::map_file;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Integer values of any width (negative ones are `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Float values, and integers widened.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The type code GGUF writes for this value.
    fn type_code(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
}

/// ggml's type code for a dtype (`ggml_type`), where GGUF can hold it.
pub fn ggml_type(dtype: DType) -> Option<u32> {
    Some(match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 => 8,
        DType::Q4K => 12,
        DType::Q5K => 13,
        DType::Q6K => 14,
        DType::BF16 => 30,
        DType::Nf4 => return None,
    })
}

fn dtype_of_ggml(code: u32) -> Option<DType> {
    DType::ALL.into_iter().find(|&d| ggml_type(d) == Some(code))
}

/// One tensor's entry: its name, HF-order shape (outermost first: a weight is [rows, cols])
/// and where its bytes lie in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub bytes: usize,
}

/// An open GGUF file: its metadata and tensor index, with the data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    map: Mmap,
}

impl GgufFile {
    /// Opens and indexes `path` (the tensor data is mapped, not read).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let map = map_file(path)?;
        let (version, metadata, tensors) =
            parse(&map).map_err(|reason| ModelError::format(path, "GGUF", reason))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of a tensor (bounds were checked when the file was opened).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.map[info.offset..info.offset + info.bytes]
    }
}

/// A cursor over the header bytes whose reads fail with a message instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                self.pos,
                self.bytes.len()
            )
        })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item_bytes` long, checked against what remains.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > remaining {
            return Err(format!(
                "{what} declares {n} items, more than the {remaining} bytes left can hold"
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(
        &mut self,
        code: u32,
        key: &str,
        depth: usize,
    ) -> std::result::Result<GgufValue, String> {
        Ok(match code {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("{key}: bool byte {b}")),
            },
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(format!("{key}: nested arrays are not supported"));
                }
                let item = self.u32(key)?;
                let n = self.count(key, 1)?;
                let items = (0..n)
                    .map(|_| self.value(item, key, depth + 1))
                    .collect::<std::result::Result<_, _>>()?;
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(format!("{key}: unknown value type {other}")),
        })
    }
}

type Parsed = (u32, BTreeMap<String, GgufValue>, Vec<GgufTensorInfo>);

fn parse(bytes: &[u8]) -> std::result::Result<Parsed, String> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(4, "magic")? != MAGIC {
        return Err("the magic bytes are not \"GGUF\"".into());
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("version {version}; versions 2 and 3 are supported"));
    }
    // The smallest tensor info is 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    let n_tensors = r.count("tensor count", 24)?;
    let n_kv = r.count("metadata count", 12)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let code = r.u32(&key)?;
        let value = r.value(code, &key, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(format!("general.alignment = {v:?} is not a power of two")),
        },
    };
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        raw.push(tensor_info(&mut r)?);
    }
    let data_start = r.pos.next_multiple_of(alignment);
    raw.into_iter()
        .map(|(name, shape, dtype, offset)| {
            locate(
                name,
                shape,
                dtype,
                offset,
                data_start,
                alignment,
                bytes.len(),
            )
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(|tensors| (version, metadata, tensors))
}

fn tensor_info(r: &mut Reader) -> std::result::Result<(String, Vec<usize>, DType, u64), String> {
    let name = r.string("tensor name")?;
    let n_dims = r.u32(&name)? as usize;
    if n_dims == 0 || n_dims > 4 {
        return Err(format!(
            "tensor {name}: {n_dims} dimensions (1 to 4 are allowed)"
        ));
    }
    let mut shape = Vec::with_capacity(n_dims);
    for _ in 0..n_dims {
        let d = r.u64(&name)?;
        shape.push(usize::try_from(d).map_err(|_| format!("tensor {name}: dimension {d}"))?);
    }
    shape.reverse(); // ggml lists the innermost dimension first
    let code = r.u32(&name)?;
    let dtype = dtype_of_ggml(code).ok_or_else(|| {
        format!("tensor {name}: ggml type {code} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K are)")
    })?;
    let offset = r.u64(&name)?;
    Ok((name, shape, dtype, offset))
}

fn locate(
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    offset: u64,
    data_start: usize,
    alignment: usize,
    file_len: usize,
) -> std::result::Result<GgufTensorInfo, String> {
    let elems = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let row = *shape.last().expect("tensor_info rejects 0 dimensions");
    let bytes = elems
        .filter(|_| row.is_multiple_of(dtype.block_len()))
        .and_then(|n| dtype.storage_bytes(n))
        .ok_or_else(|| format!("tensor {name}: shape {shape:?} does not fit {dtype} blocks"))?;
    if !(offset as usize).is_multiple_of(alignment) {
        return Err(format!(
            "tensor {name}: offset {offset} is not aligned to {alignment}"
        ));
    }
    let start = usize::try_from(offset)
        .ok()
        .and_then(|o| o.checked_add(data_start));
    match start.and_then(|s| s.checked_add(bytes).map(|e| (s, e))) {
        Some((start, end)) if end <= file_len => Ok(GgufTensorInfo {
            name,
            shape,
            dtype,
            offset: start,
            bytes,
        }),
        _ => Err(format!(
            "tensor {name}: {bytes} bytes at data offset {offset} run past the end of the file ({file_len} bytes)"
        )),
    }
}

/// A tensor to write: name, HF-order shape, dtype and its stored bytes.
pub struct GgufTensor<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub dtype: DType,
    pub bytes: &'a [u8],
}

/// Writes a GGUF v3 file (to a temporary name, then renamed).
pub fn write_gguf(
    path: &Path,
    metadata: &BTreeMap<String, GgufValue>,
    tensors: &[GgufTensor],
) -> Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        out.extend_from_slice(&value.type_code().to_le_bytes());
        put_value(&mut out, value);
    }
    let mut offset = 0usize;
    for t in tensors {
        let code = ggml_type(t.dtype).ok_or_else(|| ModelError::TensorMismatch {
            name: t.name.into(),
            expected: "a dtype GGUF can hold".into(),
            found: t.dtype.to_string(),
        })?;
        put_string(&mut out, t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&code.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + t.bytes.len()).next_multiple_of(DEFAULT_ALIGNMENT);
    }
    for t in tensors {
        out.resize(out.len().next_multiple_of(DEFAULT_ALIGNMENT), 0);
        out.extend_from_slice(t.bytes);
    }
    llama_core::write_atomic(path, &out)?;
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(items) => {
            let code = items.first().map_or(0, GgufValue::type_code);
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|v| put_value(out, v));
        }
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}
