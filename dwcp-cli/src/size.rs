//! Byte sizes on the command line: `4096`, `64K`, `512M`, `1G`, `1GiB`, `4G`, `1T` (powers of 1024).

/// Parses a positive size. Suffixes K, M, G, T (case-insensitive) multiply by powers of 1024 and may be
/// followed by `B` or `iB`; a bare `B` means bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    if number.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a number with an optional K/M/G/T suffix"
        ));
    }
    let shift = match suffix.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown suffix {suffix:?} (K, M, G, T)"
            ));
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    if n == 0 {
        return Err(format!("invalid size {s:?}: must be positive"));
    }
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("8 MiB"), Ok(8 << 20));
        assert_eq!(parse_size("100B"), Ok(100));
    }

    #[test]
    fn bad_sizes() {
        for s in [
            "",
            "G",
            "0",
            "0M",
            "-1",
            "1.5G",
            "12Q",
            "1GG",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(s).is_err(), "{s:?} accepted");
        }
    }
}
