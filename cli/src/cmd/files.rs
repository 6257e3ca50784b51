//! `nestbox cp` (local ↔ `VM:path`; directories through `archive`, as
//! tar streams; a progress line on a terminal) and `nestbox ls`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncRead, ReadBuf};

use crate::target::Context;

#[derive(clap::Args)]
pub struct CpArgs {
    /// `LOCAL` or `VM:PATH`.
    from: String,
    /// `LOCAL` or `VM:PATH` (one of the two is a VM's).
    to: String,
}

#[derive(clap::Args)]
pub struct LsArgs {
    /// `VM:PATH` (or `VM`: its `/`).
    target: String,
    /// JSON.
    #[arg(long)]
    json: bool,
}

/// `VM:PATH`, or a local path.
fn remote(spec: &str) -> Option<(&str, &str)> {
    if spec.starts_with('/') || spec.starts_with('.') {
        return None;
    }
    spec.split_once(':')
        .filter(|(vm, _)| !vm.is_empty() && !vm.contains('/'))
}

/// A reader that counts, for the progress line.
struct Counting<R> {
    inner: R,
    done: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.done
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

/// Bytes in MiB, for the progress line.
#[allow(clippy::cast_precision_loss, reason = "a figure for a person")]
fn mib(n: u64) -> f64 {
    n as f64 / f64::from(1u32 << 20)
}

/// Prints `done` of `total` on stderr every 200 ms while on a terminal,
/// until dropped.
struct Progress(Option<tokio::task::JoinHandle<()>>);

impl Progress {
    fn start(what: String, done: Arc<AtomicU64>, total: Option<u64>) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let t0 = Instant::now();
        Self(Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let n = done.load(Ordering::Relaxed);
                let rate = mib(n) / t0.elapsed().as_secs_f64().max(0.001);
                let of = total.map_or_else(String::new, |t| {
                    let pct = if t == 0 {
                        100.0
                    } else {
                        mib(n) * 100.0 / mib(t)
                    };
                    format!(" of {:.1} MiB ({pct:.0}%)", mib(t))
                });
                eprint!("\r{what}: {:.1} MiB{of}, {rate:.1} MiB/s   ", mib(n));
            }
        })))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
            eprintln!();
        }
    }
}

pub async fn cp(ctx: &mut Context, args: &CpArgs) -> anyhow::Result<u8> {
    match (remote(&args.from), remote(&args.to)) {
        (None, Some((vm, path))) => upload(ctx, Path::new(&args.from), vm, path).await,
        (Some((vm, path)), None) => download(ctx, vm, path, Path::new(&args.to)).await,
        _ => anyhow::bail!(
            "one side is a VM's (`VM:PATH`) and the other a local path: `nestbox cp ./file web:/srv/` or `nestbox cp web:/srv/file .`"
        ),
    }
}

/// The remote path a local `from` lands at: into `to` when it ends with `/`.
fn into(to: &str, from: &Path) -> String {
    if to.ends_with('/') || to.is_empty() {
        let name = from
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        format!("{}{name}", if to.is_empty() { "/" } else { to })
    } else {
        to.to_owned()
    }
}

async fn upload(ctx: &mut Context, from: &Path, vm: &str, to: &str) -> anyhow::Result<u8> {
    let client = ctx.client(vm)?;
    let meta = std::fs::metadata(from).with_context(|| format!("{}", from.display()))?;
    let done = Arc::new(AtomicU64::new(0));
    if meta.is_dir() {
        // A tar stream made on a thread, through a pipe.
        let (reader, writer) = tokio::io::duplex(256 << 10);
        let dir = from.to_owned();
        let name = dir
            .file_name()
            .map_or_else(|| "dir".to_owned(), |n| n.to_string_lossy().into_owned());
        let packer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let writer = tokio_util::io::SyncIoBridge::new(writer);
            let mut builder = tar::Builder::new(writer);
            builder.follow_symlinks(false);
            builder.append_dir_all(&name, &dir)?;
            builder.into_inner()?;
            Ok(())
        });
        let progress = Progress::start(
            format!("{} → {vm}:{to}", from.display()),
            done.clone(),
            None,
        );
        let counted = Counting {
            inner: reader,
            done: done.clone(),
        };
        let dest = if to.is_empty() { "/" } else { to };
        let extracted = client.fs_archive_put(dest, false, counted).await?;
        drop(progress);
        packer.await??;
        println!(
            "{} → {vm}:{dest}: {} entries, {} bytes",
            from.display(),
            extracted.entries,
            extracted.bytes
        );
    } else {
        let file = tokio::fs::File::open(from).await?;
        let dest = into(to, from);
        let progress = Progress::start(
            format!("{} → {vm}:{dest}", from.display()),
            done.clone(),
            Some(meta.len()),
        );
        let mode = format!(
            "{:04o}",
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777
        );
        let written = client
            .fs_write(&dest, &mode, true, Counting { inner: file, done })
            .await?;
        drop(progress);
        println!(
            "{} → {vm}:{}: {} bytes, sha256 {}",
            from.display(),
            written.path,
            written.size,
            written.sha256
        );
    }
    Ok(0)
}

async fn download(ctx: &mut Context, vm: &str, from: &str, to: &Path) -> anyhow::Result<u8> {
    let client = ctx.client(vm)?;
    let listing = client.fs_list(from).await?;
    let is_file = listing.entries.len() == 1
        && listing.entries[0].path == listing.path
        && !listing.entries[0].is_dir;
    let done = Arc::new(AtomicU64::new(0));
    if is_file {
        let size = listing.entries[0].size;
        let dest: PathBuf = if to.is_dir() {
            to.join(from.rsplit('/').next().unwrap_or("file"))
        } else {
            to.to_owned()
        };
        let tmp = dest.with_extension("nestbox-part");
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("{}", tmp.display()))?;
        let progress = Progress::start(
            format!("{vm}:{from} → {}", dest.display()),
            done.clone(),
            Some(size),
        );
        let mut counted = CountingWrite {
            inner: &mut file,
            done,
        };
        let result = client.fs_read(from, None, &mut counted).await;
        drop(progress);
        if let Err(err) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(err.into());
        }
        file.sync_all().await?;
        tokio::fs::rename(&tmp, &dest).await?;
        println!("{vm}:{from} → {}: {size} bytes", dest.display());
    } else {
        // The tar stream, extracted here on a thread.
        std::fs::create_dir_all(to).with_context(|| format!("{}", to.display()))?;
        let (reader, mut writer) = tokio::io::duplex(256 << 10);
        let dest = to.to_owned();
        let unpacker = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let handle = tokio::runtime::Handle::current();
            let reader = tokio_util::io::SyncIoBridge::new_with_handle(reader, handle);
            let mut archive = tar::Archive::new(reader);
            archive.set_overwrite(true);
            archive.unpack(&dest)?;
            Ok(())
        });
        let progress = Progress::start(
            format!("{vm}:{from} → {}", to.display()),
            done.clone(),
            None,
        );
        let mut counted = CountingWrite {
            inner: &mut writer,
            done: done.clone(),
        };
        let result = client.fs_archive_get(from, false, &mut counted).await;
        drop(counted);
        drop(writer);
        drop(progress);
        result?;
        unpacker.await??;
        println!(
            "{vm}:{from} → {}: {} bytes of tar",
            to.display(),
            done.load(Ordering::Relaxed)
        );
    }
    Ok(0)
}

/// A writer that counts, for the progress line.
struct CountingWrite<'a, W> {
    inner: &'a mut W,
    done: Arc<AtomicU64>,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountingWrite<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            self.done.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

pub async fn ls(ctx: &mut Context, args: &LsArgs) -> anyhow::Result<u8> {
    let (vm, path) = args.target.split_once(':').unwrap_or((&args.target, "/"));
    let listing = ctx
        .client(vm)?
        .fs_list(if path.is_empty() { "/" } else { path })
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(0);
    }
    for e in &listing.entries {
        let kind = match e.kind.as_str() {
            "directory" => 'd',
            "symlink" => 'l',
            "file" => '-',
            _ => '?',
        };
        let target = e
            .target
            .as_ref()
            .map_or_else(String::new, |t| format!(" -> {t}"));
        println!(
            "{kind}{} {:>12} {} {}{target}",
            e.mode, e.size, e.mod_time, e.name
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides() {
        assert_eq!(remote("web:/srv/x"), Some(("web", "/srv/x")));
        assert_eq!(remote("web:"), Some(("web", "")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/tmp/a:b"), None);
        assert_eq!(remote("file.txt"), None);
        assert_eq!(into("/srv/", Path::new("/tmp/a.txt")), "/srv/a.txt");
        assert_eq!(into("/srv/b.txt", Path::new("/tmp/a.txt")), "/srv/b.txt");
        assert_eq!(into("", Path::new("a.txt")), "/a.txt");
    }
}
