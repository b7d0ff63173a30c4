//! Quoting for the two parsers a QEMU argument meets: the shell (when a
//! command line is printed for a human to paste) and QEMU's own `key=value,..`
//! option parser (QemuOpts), where a literal comma must be doubled.

use std::borrow::Cow;

/// Quotes `word` for a POSIX shell, leaving it bare when that is safe.
///
/// ```
/// use gmem_qemu::quote::shell_quote;
/// assert_eq!(shell_quote("-m"), "-m");
/// assert_eq!(shell_quote("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
/// assert_eq!(shell_quote("it's"), r#"'it'\''s'"#);
/// ```
pub fn shell_quote(word: &str) -> Cow<'_, str> {
    let is_safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !word.is_empty() && word.chars().all(is_safe) {
        return Cow::Borrowed(word);
    }
    // Inside single quotes nothing is special except the quote itself, which
    // has to close the quoting, be escaped, and reopen it.
    Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
}

/// Joins `words` into one line a shell splits back into the same words.
pub fn shell_join<I, S>(words: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let quoted: Vec<String> = words.into_iter().map(|word| shell_quote(word.as_ref()).into_owned()).collect();
    quoted.join(" ")
}

/// Escapes a value for a QemuOpts list (`-object`, `-chardev`, `-qmp unix:`):
/// a comma would end the value, so QEMU wants it doubled.
pub fn qemu_opt_value(value: &str) -> Cow<'_, str> {
    if value.contains(',') {
        Cow::Owned(value.replace(',', ",,"))
    } else {
        Cow::Borrowed(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("/proc/12/fd/3"), "/proc/12/fd/3");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        assert_eq!(shell_join(["echo", "a b", "c"]), "echo 'a b' c");
    }

    #[test]
    fn qemu_commas_are_doubled() {
        assert_eq!(qemu_opt_value("/tmp/x"), "/tmp/x");
        assert_eq!(qemu_opt_value("/tmp/a,b,c"), "/tmp/a,,b,,c");
    }
}
