//! The file commands (`fs3 ls|stat|cat|cp|mkdir|rm|mv|setlayout`) on the native client: no
//! mount needed. Paths inside fs3 are absolute (`/data/x`); `cp` tells them from local paths by
//! an `fs3:` prefix (`fs3 cp ./local fs3:/data/x`). Identity is the caller's uid, gid and
//! groups (honoured by a trusted token; a user's token acts as its user whatever they are).

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use fs3_client::{Fs3, Fs3Options, FsError, ROOT};
use fs3_proto::meta::{Credentials, Inode, InodeKind, Layout};
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::json;

/// Attribute reads `ls -l` keeps in flight.
const LIST_PARALLELISM: usize = 32;

/// How the file commands reach the cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct Connect {
    /// mgmtd replicas (host:port, comma separated).
    #[arg(
        long,
        env = "FS3_MGMTD",
        value_delimiter = ',',
        default_value = "127.0.0.1:8000",
        global = true
    )]
    pub mgmtd: Vec<String>,
    /// The token to present to meta (see `fs3 admin user add`).
    #[arg(long, env = "FS3_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// A file holding the token.
    #[arg(long, env = "FS3_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// How chunk data moves: auto (RDMA when storage has it too), tcp, or rdma (only).
    #[arg(
        long,
        env = "FS3_TRANSPORT",
        default_value = "auto",
        value_parser = ["auto", "tcp", "rdma"],
        global = true
    )]
    pub transport: String,
}

impl Connect {
    /// The token from `--token`, or the token file; empty if neither is given.
    pub fn token(&self) -> anyhow::Result<String> {
        if let Some(token) = &self.token {
            return Ok(token.trim().to_string());
        }
        match &self.token_file {
            Some(path) => Ok(std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .trim()
                .to_string()),
            None => Ok(String::new()),
        }
    }

    /// A connected client.
    pub async fn connect(&self) -> anyhow::Result<Fs3> {
        let transport = match self.transport.as_str() {
            "tcp" => ff_net::TransportKind::Tcp,
            "rdma" => ff_net::TransportKind::Rdma,
            _ => ff_net::TransportKind::Auto,
        };
        let options = Fs3Options {
            mgmtd: self.mgmtd.clone(),
            token: self.token()?,
            net: ff_net::NetConfig {
                transport,
                ..ff_net::NetConfig::default()
            },
            ..Fs3Options::default()
        };
        Fs3::connect(options)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to fs3: {e}"))
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum FileCmd {
    /// List a directory.
    Ls {
        /// The directory (or file).
        #[arg(default_value = "/")]
        path: String,
        /// Long listing: type, mode, owner, size, time.
        #[arg(short)]
        long: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an inode: attributes and layout.
    Stat {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a file to standard output.
    Cat { path: String },
    /// Copy a file: local to fs3, fs3 to local, or fs3 to fs3 (`fs3:` marks fs3 paths).
    Cp {
        source: String,
        destination: String,
        /// Bytes per request (chunks of one request are written in parallel).
        #[arg(long, default_value = "16MiB")]
        block: ff_config::ByteSize,
    },
    /// Create a directory.
    Mkdir {
        path: String,
        /// Create missing parents; no error if it exists.
        #[arg(short, long)]
        parents: bool,
        /// Permission bits (octal).
        #[arg(long, default_value = "755")]
        mode: String,
    },
    /// Remove a file, or a directory with -r.
    Rm {
        path: String,
        #[arg(short, long)]
        recursive: bool,
    },
    /// Rename.
    Mv { source: String, destination: String },
    /// Set a directory's layout for files created in it (or an empty file's).
    Setlayout {
        path: String,
        /// Chunk size (power of two, 64KiB to 64MiB).
        #[arg(long)]
        chunk_size: Option<ff_config::ByteSize>,
        /// How many chains a file spreads over.
        #[arg(long)]
        stripe: Option<u32>,
        /// The chain table.
        #[arg(long)]
        table: Option<u64>,
    },
}

/// The caller's identity.
pub fn caller() -> Credentials {
    Credentials {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        groups: nix::unistd::getgroups()
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default(),
    }
}

/// `path` without a `fs3:` prefix, checked to be absolute.
fn fs3_path(path: &str) -> anyhow::Result<&str> {
    let path = path.strip_prefix("fs3:").unwrap_or(path);
    if !path.starts_with('/') {
        bail!("fs3 paths are absolute (start with '/'): {path:?}");
    }
    if path.contains('\0') {
        bail!("paths cannot contain NUL");
    }
    Ok(path)
}

/// The parent directory and final name of an fs3 path.
fn split(path: &str) -> anyhow::Result<(&str, &str)> {
    let trimmed = path.trim_end_matches('/');
    let (parent, name) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    if name.is_empty() || name == "." || name == ".." {
        bail!("{path:?} does not name an entry");
    }
    Ok((if parent.is_empty() { "/" } else { parent }, name))
}

fn with_path(path: &str) -> impl FnOnce(FsError) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{path}: {e}")
}

fn kind_name(kind: i32) -> &'static str {
    match InodeKind::try_from(kind) {
        Ok(InodeKind::Directory) => "dir",
        Ok(InodeKind::Symlink) => "symlink",
        _ => "file",
    }
}

fn mode_string(inode: &Inode) -> String {
    let kind = match kind_name(inode.kind) {
        "dir" => 'd',
        "symlink" => 'l',
        _ => '-',
    };
    let bits = ["---", "--x", "-w-", "-wx", "r--", "r-x", "rw-", "rwx"];
    format!(
        "{kind}{}{}{}",
        bits[((inode.mode >> 6) & 7) as usize],
        bits[((inode.mode >> 3) & 7) as usize],
        bits[(inode.mode & 7) as usize]
    )
}

fn inode_json(inode: &Inode) -> serde_json::Value {
    let layout = inode.layout.clone().unwrap_or_default();
    json!({
        "inode": inode.id,
        "type": kind_name(inode.kind),
        "mode": format!("{:o}", inode.mode),
        "uid": inode.uid,
        "gid": inode.gid,
        "nlink": inode.nlink,
        "size": inode.length,
        "mtime_ns": inode.mtime_ns,
        "ctime_ns": inode.ctime_ns,
        "atime_ns": inode.atime_ns,
        "symlink_target": String::from_utf8_lossy(&inode.symlink_target),
        "layout": {
            "chunk_size": layout.chunk_size,
            "stripe": layout.stripe,
            "table": layout.table_id,
            "chains": layout.chains,
        },
    })
}

pub async fn run(command: FileCmd, connect: &Connect) -> anyhow::Result<()> {
    let fs = connect.connect().await?;
    let me = caller();
    match command {
        FileCmd::Ls { path, long, json } => {
            let path = fs3_path(&path)?;
            let inode = fs.resolve(&me, path).await.map_err(with_path(path))?;
            let entries: Vec<(String, Inode)> = if inode.kind == InodeKind::Directory as i32 {
                let listing = fs
                    .readdir_all(&me, inode.id)
                    .await
                    .map_err(with_path(path))?;
                // Attributes of many entries are fetched concurrently, in listing order.
                let fs = &fs;
                let me = &me;
                futures::stream::iter(listing)
                    .map(|entry| async move {
                        let name = String::from_utf8_lossy(&entry.name).to_string();
                        let attrs = if long || json {
                            fs.getattr(me, entry.inode).await?
                        } else {
                            Inode {
                                id: entry.inode,
                                kind: entry.kind,
                                ..Inode::default()
                            }
                        };
                        Ok::<_, FsError>((name, attrs))
                    })
                    .buffered(LIST_PARALLELISM)
                    .try_collect()
                    .await
                    .map_err(with_path(path))?
            } else {
                vec![(split(path)?.1.to_string(), inode)]
            };
            if json {
                let list: Vec<serde_json::Value> = entries
                    .iter()
                    .map(|(name, inode)| {
                        let mut value = inode_json(inode);
                        value["name"] = json!(name);
                        value
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if long {
                for (name, inode) in &entries {
                    let target = if inode.kind == InodeKind::Symlink as i32 {
                        format!(" -> {}", String::from_utf8_lossy(&inode.symlink_target))
                    } else {
                        String::new()
                    };
                    println!(
                        "{} {:>3} {:>6} {:>6} {:>14} {name}{target}",
                        mode_string(inode),
                        inode.nlink,
                        inode.uid,
                        inode.gid,
                        inode.length
                    );
                }
            } else {
                for (name, _) in &entries {
                    println!("{name}");
                }
            }
            Ok(())
        }
        FileCmd::Stat { path, json } => {
            let path = fs3_path(&path)?;
            let inode = fs.resolve(&me, path).await.map_err(with_path(path))?;
            let value = inode_json(&inode);
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("  path: {path}");
                for (key, field) in value.as_object().into_iter().flatten() {
                    println!("{key:>8}: {field}");
                }
            }
            Ok(())
        }
        FileCmd::Cat { path } => {
            let path = fs3_path(&path)?;
            let inode = fs.resolve(&me, path).await.map_err(with_path(path))?;
            let mut out = std::io::stdout().lock();
            let mut offset = 0;
            while offset < inode.length {
                let data = fs
                    .read_at(&inode, inode.length, offset, 4 << 20)
                    .await
                    .map_err(with_path(path))?;
                out.write_all(&data)?;
                offset += data.len() as u64;
            }
            Ok(())
        }
        FileCmd::Cp {
            source,
            destination,
            block,
        } => copy(&fs, &me, &source, &destination, block.0.max(4096)).await,
        FileCmd::Mkdir {
            path,
            parents,
            mode,
        } => {
            let path = fs3_path(&path)?;
            let mode = u32::from_str_radix(&mode, 8).context("--mode is octal, like 755")?;
            if parents {
                let mut dir = fs.getattr(&me, ROOT).await.map_err(with_path(path))?;
                for part in path.split('/').filter(|p| !p.is_empty()) {
                    dir = match fs.lookup(&me, dir.id, part.as_bytes()).await {
                        Ok(existing) => existing,
                        Err(e) if e.errno == libc::ENOENT => fs
                            .create(
                                &me,
                                dir.id,
                                part.as_bytes(),
                                InodeKind::Directory,
                                mode,
                                b"",
                            )
                            .await
                            .map_err(with_path(path))?,
                        Err(e) => return Err(with_path(path)(e)),
                    };
                }
                return Ok(());
            }
            let (parent, name) = split(path)?;
            let parent = fs.resolve(&me, parent).await.map_err(with_path(path))?;
            fs.create(
                &me,
                parent.id,
                name.as_bytes(),
                InodeKind::Directory,
                mode,
                b"",
            )
            .await
            .map_err(with_path(path))?;
            Ok(())
        }
        FileCmd::Rm { path, recursive } => {
            let path = fs3_path(&path)?;
            let (parent, name) = split(path)?;
            let parent = fs.resolve(&me, parent).await.map_err(with_path(path))?;
            let inode = fs
                .lookup(&me, parent.id, name.as_bytes())
                .await
                .map_err(with_path(path))?;
            if inode.kind == InodeKind::Directory as i32 {
                if !recursive {
                    bail!("{path} is a directory (use -r)");
                }
                remove_tree(&fs, &me, inode.id)
                    .await
                    .map_err(with_path(path))?;
            }
            fs.remove(
                &me,
                parent.id,
                name.as_bytes(),
                inode.kind == InodeKind::Directory as i32,
            )
            .await
            .map_err(with_path(path))
        }
        FileCmd::Mv {
            source,
            destination,
        } => {
            let source = fs3_path(&source)?;
            let destination = fs3_path(&destination)?;
            let (from_dir, from_name) = split(source)?;
            let from = fs.resolve(&me, from_dir).await.map_err(with_path(source))?;
            // Into an existing directory, or as a new name.
            let (to_dir, to_name) = match fs.resolve(&me, destination).await {
                Ok(dir) if dir.kind == InodeKind::Directory as i32 => {
                    (dir.id, from_name.to_string())
                }
                _ => {
                    let (dir, name) = split(destination)?;
                    let dir = fs.resolve(&me, dir).await.map_err(with_path(destination))?;
                    (dir.id, name.to_string())
                }
            };
            fs.rename(
                &me,
                from.id,
                from_name.as_bytes(),
                to_dir,
                to_name.as_bytes(),
                false,
            )
            .await
            .map_err(with_path(source))
        }
        FileCmd::Setlayout {
            path,
            chunk_size,
            stripe,
            table,
        } => {
            let path = fs3_path(&path)?;
            let inode = fs.resolve(&me, path).await.map_err(with_path(path))?;
            let current = inode.layout.clone().unwrap_or_default();
            let layout = Layout {
                chunk_size: chunk_size.map_or(current.chunk_size, |c| c.0),
                stripe: stripe.unwrap_or(current.stripe),
                table_id: table.unwrap_or(current.table_id),
                chains: Vec::new(),
            };
            let changed = fs
                .set_layout(&me, inode.id, layout)
                .await
                .map_err(with_path(path))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&inode_json(&changed)["layout"])?
            );
            Ok(())
        }
    }
}

/// Removes everything inside directory `dir`, depth first.
async fn remove_tree(fs: &Fs3, me: &Credentials, dir: u64) -> Result<(), FsError> {
    for entry in fs.readdir_all(me, dir).await? {
        let is_dir = entry.kind == InodeKind::Directory as i32;
        if is_dir {
            Box::pin(remove_tree(fs, me, entry.inode)).await?;
        }
        fs.remove(me, dir, &entry.name, is_dir).await?;
    }
    Ok(())
}

/// A progress line on a terminal: bytes, rate.
fn progress(total: u64) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Where `cp` reads from.
enum Source {
    Fs3(Inode),
    Local(std::fs::File),
}

impl Source {
    /// Up to `len` bytes at `offset` (reads are sequential).
    async fn read(&mut self, fs: &Fs3, offset: u64, len: u64) -> anyhow::Result<Vec<u8>> {
        match self {
            Source::Fs3(inode) => Ok(fs.read_at(inode, inode.length, offset, len).await?),
            Source::Local(file) => tokio::task::block_in_place(|| {
                let mut buf = vec![0u8; usize::try_from(len)?];
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file.read(&mut buf[filled..])?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                Ok(buf)
            }),
        }
    }
}

async fn copy(
    fs: &Fs3,
    me: &Credentials,
    source: &str,
    destination: &str,
    block: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let to_fs3 = destination.starts_with("fs3:");
    let (mut from, length) = if source.starts_with("fs3:") {
        let path = fs3_path(source)?;
        let inode = fs.resolve(me, path).await.map_err(with_path(path))?;
        if inode.kind != InodeKind::File as i32 {
            bail!("{path} is not a regular file");
        }
        let length = inode.length;
        (Source::Fs3(inode), length)
    } else if to_fs3 {
        let file = std::fs::File::open(source).with_context(|| format!("cannot open {source}"))?;
        let length = file.metadata()?.len();
        (Source::Local(file), length)
    } else {
        bail!("one side of cp must be an fs3 path (prefix it with fs3:)");
    };
    let bar = progress(length);
    let mut offset = 0;
    if to_fs3 {
        let path = fs3_path(destination)?;
        let (dir, name) = match fs.resolve(me, path).await {
            Ok(dir) if dir.kind == InodeKind::Directory as i32 => {
                let base = source
                    .rsplit(['/', ':'])
                    .next()
                    .unwrap_or(source)
                    .to_string();
                (dir, base)
            }
            _ => {
                let (dir, name) = split(path)?;
                (
                    fs.resolve(me, dir).await.map_err(with_path(path))?,
                    name.to_string(),
                )
            }
        };
        let (inode, session) = fs
            .create_file(me, dir.id, name.as_bytes(), 0o644, false, true)
            .await
            .map_err(with_path(path))?;
        while offset < length {
            let data = from.read(fs, offset, block.min(length - offset)).await?;
            if data.is_empty() {
                break;
            }
            let n = data.len() as u64;
            fs.write_at(&inode, &session, offset, Bytes::from(data))
                .await
                .map_err(with_path(path))?;
            offset += n;
            bar.set_position(offset);
        }
        fs.sync_session(me, &session, false)
            .await
            .map_err(with_path(path))?;
    } else {
        let mut out = std::fs::File::create(destination)
            .with_context(|| format!("cannot create {destination}"))?;
        while offset < length {
            let data = from.read(fs, offset, block.min(length - offset)).await?;
            if data.is_empty() {
                break;
            }
            out.write_all(&data)?;
            offset += data.len() as u64;
            bar.set_position(offset);
        }
        out.sync_all()?;
    }
    bar.finish_and_clear();
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "copied {offset} bytes in {seconds:.2} s ({:.1} MiB/s)",
            offset as f64 / seconds.max(1e-9) / f64::from(1 << 20)
        );
    }
    Ok(())
}
