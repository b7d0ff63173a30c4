//! Sizes as gmemd's and gmemctl's command lines spell them.

/// A size that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a size: use bytes or a number with K, M, G or T (e.g. 512M, 1G)")]
pub struct SizeError(pub String);

/// Parses `4096`, `64K`, `512M`, `1G`, `2GiB`, `64kB`, `1T` (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let error = || SizeError(text.to_string());
    let trimmed = text.trim();
    let trimmed = trimmed.strip_suffix("iB").or_else(|| trimmed.strip_suffix('B')).unwrap_or(trimmed);
    let (digits, shift) = match trimmed.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&trimmed[..trimmed.len() - 1], 10),
        Some('M') => (&trimmed[..trimmed.len() - 1], 20),
        Some('G') => (&trimmed[..trimmed.len() - 1], 30),
        Some('T') => (&trimmed[..trimmed.len() - 1], 40),
        _ => (trimmed, 0),
    };
    let value: u64 = digits.parse().map_err(|_| error())?;
    value.checked_mul(1u64 << shift).ok_or_else(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64kB"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        for bad in ["", "G", "1X", "-1G", "99999999999T", "1.5G", "fast"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
