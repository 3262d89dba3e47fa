//! Reading llama.cpp GGUF metadata values (the key/value header of a `.gguf` file), with
//! errors that name the key. The model configuration ([`super::config`]) and the tokenizer
//! ([`super::tokenizer`]) both read it.

use anyhow::{bail, Result};
use candle_core::quantized::gguf_file::{Content, Value};

/// Any of GGUF's eight integer types, widened; None for every other type.
pub fn integer(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        _ => return None,
    })
}

/// The array under `key` (None when the key is absent), each element read by `item`;
/// `what` names the element type in errors ("strings", "integers").
pub fn array<T>(content: &Content, key: &str, what: &str, item: impl Fn(&Value) -> Option<T>) -> Result<Option<Vec<T>>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match item(v) {
                Some(x) => Ok(x),
                None => bail!("GGUF metadata {key} should hold {what}, found {:?}", v.value_type()),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(v) => bail!("GGUF metadata {key} should be an array, found {:?}", v.value_type()),
    }
}
