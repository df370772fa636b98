//! A directory's entries in name order, held compactly: the names in one buffer (not a
//! `DirEntry` or a string each), so that a directory of 200,000 relation files costs a
//! few MiB to walk, when backing it up and when restoring over it.

use std::ffi::OsStr;
use std::fs::{self, FileType};
use std::io;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub(crate) struct Listing {
    names: Vec<u8>,
    entries: Vec<(Range<usize>, FileType)>,
}

impl Listing {
    /// Lists `dir`, sorted by the bytes of the names: the order of a tree's nodes, whose
    /// names are UTF-8.
    pub(crate) fn read(dir: &Path) -> io::Result<Listing> {
        let mut names = Vec::new();
        let mut entries = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let file_type = entry.file_type()?;
            let start = names.len();
            names.extend_from_slice(entry.file_name().as_bytes());
            entries.push((start..names.len(), file_type));
        }
        entries.sort_unstable_by(|(a, _), (b, _)| names[a.clone()].cmp(&names[b.clone()]));
        Ok(Listing { names, entries })
    }

    /// The entries in name order, with their types (not following symlinks).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&OsStr, FileType)> {
        self.entries
            .iter()
            .map(|(span, file_type)| (OsStr::from_bytes(&self.names[span.clone()]), *file_type))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_in_byte_order_with_types() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["b", "a", "B", "é", "a.1"] {
            fs::write(dir.path().join(name), name).expect("write");
        }
        fs::create_dir(dir.path().join("base")).expect("mkdir");
        std::os::unix::fs::symlink("a", dir.path().join("link")).expect("symlink");
        let listing = Listing::read(dir.path()).expect("list");
        let listed: Vec<(String, bool, bool)> = listing
            .iter()
            .map(|(name, t)| {
                (
                    name.to_string_lossy().into_owned(),
                    t.is_dir(),
                    t.is_symlink(),
                )
            })
            .collect();
        let expected = [
            ("B", false, false),
            ("a", false, false),
            ("a.1", false, false),
            ("b", false, false),
            ("base", true, false),
            ("link", false, true),
            ("é", false, false),
        ];
        let expected: Vec<(String, bool, bool)> = expected
            .iter()
            .map(|(n, d, l)| (n.to_string(), *d, *l))
            .collect();
        assert_eq!(listed, expected);
    }
}
