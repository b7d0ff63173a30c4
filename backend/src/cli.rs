//! Parsing of the command-line values that are more than a plain string.

use std::path::PathBuf;

use crate::memory::{Backing, RegionSpec};

/// A command-line value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// A malformed --region.
    #[error("--region '{spec}': {why}; expected id=NAME,size=SIZE[,hugetlb][,path=FILE]")]
    Region { spec: String, why: String },
}

pub use gmem_protocol::parse_size;

/// Parses one `--region id=NAME,size=SIZE[,hugetlb][,path=FILE]`.
pub fn parse_region(spec: &str) -> Result<RegionSpec, CliError> {
    let fail = |why: &str| CliError::Region { spec: spec.to_string(), why: why.to_string() };
    let (mut id, mut size, mut hugetlb, mut path) = (None, None, false, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            // The id becomes QEMU's object id, which must start with a letter.
            Some(("id", v))
                if v.starts_with(|c: char| c.is_ascii_alphabetic())
                    && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                id = Some(v.to_string())
            }
            Some(("id", _)) => {
                return Err(fail(
                    "id must start with a letter and hold only letters, digits, '-' or '_' (it is QEMU's object id)",
                ))
            }
            Some(("size", v)) => size = Some(parse_size(v).map_err(|e| fail(&e.to_string()))?),
            Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
            None if part == "hugetlb" => hugetlb = true,
            _ => return Err(fail(&format!("unknown option '{part}'"))),
        }
    }
    let backing = match (hugetlb, path) {
        (false, None) => Backing::Memfd,
        (true, None) => Backing::MemfdHugetlb,
        // A file on hugetlbfs is hugetlb-backed by where it lives.
        (_, Some(path)) => Backing::File(path),
    };
    Ok(RegionSpec {
        id: id.ok_or_else(|| fail("missing id="))?,
        size: size.ok_or_else(|| fail("missing size="))?,
        backing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions() {
        let r = parse_region("id=ram0,size=1G").expect("plain");
        assert_eq!((r.id.as_str(), r.size, r.backing), ("ram0", 1 << 30, Backing::Memfd));
        assert_eq!(parse_region("id=h,size=2M,hugetlb").expect("huge").backing, Backing::MemfdHugetlb);
        let f = parse_region("size=4M,id=f,path=/dev/shm/ram").expect("file");
        assert_eq!(f.backing, Backing::File("/dev/shm/ram".into()));
        let bad = [
            "size=1G",
            "id=x",
            "id=,size=1G",
            "id=a b,size=1G",
            "id=0ram,size=1G",
            "id=-x,size=1G",
            "id=x,size=1Q",
            "id=x,size=1G,color=red",
        ];
        for bad in bad {
            let error = parse_region(bad).expect_err(bad);
            assert!(error.to_string().contains("expected id=NAME"), "{error}");
        }
    }
}
