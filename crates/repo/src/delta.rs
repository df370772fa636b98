//! Deltas between two blobs of the same length: their XOR. A chunk of a relation file in
//! which a few pages changed XORs with its previous version to zeros except where bytes
//! differ, which compresses to almost nothing; applying is the same XOR again.

#[derive(Debug, thiserror::Error)]
#[error("the delta has {delta} bytes but its base {base}")]
pub struct LengthMismatch {
    delta: usize,
    base: usize,
}

/// Turns `data` into its delta against `base` (or a delta back into the data).
pub fn apply(data: &mut [u8], base: &[u8]) -> Result<(), LengthMismatch> {
    if data.len() != base.len() {
        return Err(LengthMismatch {
            delta: data.len(),
            base: base.len(),
        });
    }
    // Word-wise so the compiler vectorises it; the tail is at most 7 bytes.
    let mut words = data.chunks_exact_mut(8);
    let mut base_words = base.chunks_exact(8);
    for (word, base_word) in (&mut words).zip(&mut base_words) {
        let x = u64::from_ne_bytes(word[..8].try_into().unwrap_or([0; 8]))
            ^ u64::from_ne_bytes(base_word.try_into().unwrap_or([0; 8]));
        word.copy_from_slice(&x.to_ne_bytes());
    }
    for (byte, base_byte) in words
        .into_remainder()
        .iter_mut()
        .zip(base_words.remainder())
    {
        *byte ^= base_byte;
    }
    Ok(())
}

/// How many bytes differ between two blobs of the same length.
pub fn differing_bytes(data: &[u8], base: &[u8]) -> usize {
    data.iter().zip(base).filter(|(a, b)| a != b).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_twice_gives_the_data_back() {
        let base: Vec<u8> = (0..8195u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut data = base.clone();
        data[3] ^= 0x55;
        data[8194] = 0;
        let original = data.clone();
        apply(&mut data, &base).expect("same length");
        assert_eq!(data.iter().filter(|b| **b != 0).count(), 2);
        assert_eq!(differing_bytes(&original, &base), 2);
        apply(&mut data, &base).expect("same length");
        assert_eq!(data, original);
        assert!(apply(&mut data, &base[1..]).is_err());
    }
}
