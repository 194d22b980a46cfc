//! Atomic file system writes: a file through a temp file and a rename, a
//! whole directory assembled beside its destination and swapped into place.
//! Every module and stage that writes an output file goes through here, so a
//! crash never leaves a half-written file or directory behind.

use anyhow::{anyhow, Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temp file in the same directory and a
/// rename, so a crash never leaves a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| {
        w.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))
    })
}

/// Streams a file to `path`: `fill` writes it (buffered) into a temp file
/// in the same directory, which is flushed, synced and renamed into place
/// only when `fill` succeeds. For files too large to build in memory
/// (checkpoint shards); an error or a crash leaves no file at `path`.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    let tmp = with_default_mode(&mut tempfile::Builder::new(), 0o666)
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
        fill(&mut w)?;
        w.flush().with_context(|| format!("cannot write {}", path.display()))?;
    }
    tmp.as_file().sync_all().with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).map_err(|e| anyhow!("cannot move the temp file to {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Builds a directory with `fill` in a sibling temp directory, then puts it
/// at `dir`. An older `dir` is swapped out in one atomic exchange
/// (`renameat2` with `RENAME_EXCHANGE`) and then deleted, so at every moment
/// `dir` is either the complete old directory or the complete new one. Where
/// the file system cannot exchange, the old one is renamed aside first, and
/// a crash between the two renames leaves it as `.NAME.old-PID` beside the
/// staged `.NAME.partial-*`.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create directory {}", parent.display()))?;
    let name = dir.file_name().ok_or_else(|| anyhow!("{} is not a directory name", dir.display()))?;
    let tmp = with_default_mode(&mut tempfile::Builder::new(), 0o777)
        .prefix(&format!(".{}.partial-", name.to_string_lossy()))
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a temp directory in {}", parent.display()))?;
    fill(tmp.path())?;
    if dir.exists() {
        if exchange(tmp.path(), dir).is_ok() {
            // `tmp` now holds the old directory; dropping it deletes it.
            return Ok(());
        }
        let staged = tmp.keep();
        let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
        std::fs::rename(dir, &old).with_context(|| format!("cannot move aside {}", dir.display()))?;
        std::fs::rename(&staged, dir).with_context(|| format!("cannot move {} into place", dir.display()))?;
        std::fs::remove_dir_all(&old).ok();
    } else {
        let staged = tmp.keep();
        std::fs::rename(&staged, dir).with_context(|| format!("cannot move {} into place", dir.display()))?;
    }
    Ok(())
}

/// Gives temp files and directories the mode a plain `File::create` or
/// `create_dir` would (`mode` less the umask) instead of tempfile's private
/// 0600/0700, so the renamed output is as readable as any other file the
/// user writes (a checkpoint shared with a group, served by another user).
fn with_default_mode<'b, 'p, 's>(
    builder: &'b mut tempfile::Builder<'p, 's>,
    mode: u32,
) -> &'b mut tempfile::Builder<'p, 's> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        builder
    }
}

/// Atomically swaps two paths (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings for the call.
    let r = unsafe {
        libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// `path` made absolute with symbolic links resolved, for comparing paths:
/// `canonicalize` where the path exists, else its nearest existing ancestor
/// canonicalized with the rest appended (an output that is not written yet).
pub fn canonical(path: &Path) -> std::path::PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    let mut rest = vec![];
    let mut at = abs.as_path();
    loop {
        if let Ok(p) = at.canonicalize() {
            return rest.iter().rev().fold(p, |acc, part| acc.join(part));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                at = parent;
            }
            _ => return abs,
        }
    }
}

/// Whether two paths name the same file, compared canonically
/// ([`canonical`]), so `./a.jsonl`, `dir/../a.jsonl` and a link to it are one.
pub fn same_file(a: &Path, b: &Path) -> bool {
    canonical(a) == canonical(b)
}

/// Refuses to write `out` (given as `out_flag`) when it is the input
/// `input` (given as `input_flag`): the one check every command that reads
/// a file and writes another makes before any work.
pub fn refuse_overwriting_input(out: &Path, out_flag: &str, input: &Path, input_flag: &str) -> Result<()> {
    if same_file(out, input) {
        anyhow::bail!(
            "{out_flag} {} is the input file ({input_flag}); writing it would destroy the input. Write to a new file",
            out.display()
        );
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn outputs_get_the_same_mode_as_plain_files_and_directories() {
        let root = tempfile::tempdir().unwrap();
        let plain_file = root.path().join("plain.txt");
        std::fs::write(&plain_file, b"x").unwrap();
        let plain_dir = root.path().join("plain-dir");
        std::fs::create_dir(&plain_dir).unwrap();

        let file = root.path().join("atomic.txt");
        write_atomic(&file, b"x").unwrap();
        assert_eq!(mode(&file), mode(&plain_file), "write_atomic's file mode");
        let dir = root.path().join("atomic-dir");
        write_dir_atomic(&dir, |d| write_atomic(&d.join("f"), b"y")).unwrap();
        assert_eq!(mode(&dir), mode(&plain_dir), "write_dir_atomic's directory mode");
        assert_eq!(mode(&dir.join("f")), mode(&plain_file));
        // Not the private modes tempfile would give (0600 / 0700) unless the umask says so.
        assert_eq!(mode(&file) & 0o600, 0o600);
    }
}
