//! A plain record stream for state-machine snapshots: length-prefixed (key, value) pairs, read
//! back with limits so that a damaged or hostile snapshot cannot make a member allocate
//! without bound.

use std::io::{self, Read, Write};

use crate::error::StateMachineError;

/// One (key, value) record.
pub type Record = (Vec<u8>, Vec<u8>);

/// Writes one record: key length (u32 LE), key, value length (u32 LE), value.
pub fn write_record(out: &mut dyn Write, key: &[u8], value: &[u8]) -> io::Result<()> {
    for part in [key, value] {
        let len = u32::try_from(part.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record part over 4 GiB"))?;
        out.write_all(&len.to_le_bytes())?;
        out.write_all(part)?;
    }
    Ok(())
}

/// Reads the next record, `None` at a clean end of the stream. Keys over `max_key` bytes and
/// values over `max_value` bytes are refused as corrupt.
pub fn read_record(
    input: &mut dyn Read,
    max_key: usize,
    max_value: usize,
) -> Result<Option<Record>, StateMachineError> {
    let mut len = [0u8; 4];
    if !read_exact_or_eof(input, &mut len)? {
        return Ok(None);
    }
    let key = read_vec(input, u32::from_le_bytes(len) as usize, max_key, "key")?;
    input.read_exact(&mut len)?;
    let value = read_vec(input, u32::from_le_bytes(len) as usize, max_value, "value")?;
    Ok(Some((key, value)))
}

/// Fills `buf`; `Ok(false)` on a clean end of input before the first byte.
fn read_exact_or_eof(input: &mut dyn Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..])? {
            0 if filled == 0 => return Ok(false),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated record",
                ));
            }
            n => filled += n,
        }
    }
    Ok(true)
}

fn read_vec(
    input: &mut dyn Read,
    len: usize,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, StateMachineError> {
    if len > max {
        return Err(StateMachineError::Corrupt(format!(
            "{what} of {len} bytes exceeds {max}"
        )));
    }
    let mut buf = vec![0u8; len];
    input.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_limits_hold() {
        let mut out = Vec::new();
        write_record(&mut out, b"key", b"value").unwrap();
        write_record(&mut out, b"", b"").unwrap();
        let mut input = out.as_slice();
        assert_eq!(
            read_record(&mut input, 16, 16).unwrap(),
            Some((b"key".to_vec(), b"value".to_vec()))
        );
        assert_eq!(
            read_record(&mut input, 16, 16).unwrap(),
            Some((vec![], vec![]))
        );
        assert_eq!(read_record(&mut input, 16, 16).unwrap(), None);
        let mut input = out.as_slice();
        assert!(read_record(&mut input, 16, 2).is_err());
        let truncated = &out[..6];
        assert!(read_record(&mut &truncated[..], 16, 16).is_err());
    }
}
