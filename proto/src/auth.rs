//! Bearer-token authentication shared by the coordinator, the workers and the CLI.
//!
//! Every RPC except `grpc.health.v1.Health` carries `authorization: Bearer <token>`. The
//! coordinator takes its token from `--token-file`, else `HERD_TOKEN`, else `<state-dir>/token`,
//! which [`load_or_create_token`] creates on first start (32 random bytes as 64 hex characters,
//! mode 0600, created atomically). Clients read the same file or the environment.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// The environment variable clients and the coordinator read the token from.
pub const TOKEN_ENV: &str = "HERD_TOKEN";
/// The token's file name inside a state directory.
pub const TOKEN_FILE_NAME: &str = "token";

/// `<state_dir>/token`.
pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join(TOKEN_FILE_NAME)
}

/// 32 bytes of OS randomness as 64 lowercase hex characters.
pub fn generate_token() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(format!("OS randomness: {e}")))?;
    Ok(hex(&bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

/// Refuse a token file that group or others may read or write (like ssh does for keys).
#[cfg(unix)]
pub fn check_private(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: the token file has mode {mode:04o}, readable or writable by group/others; \
                 refusing to use it (run `chmod 600 {}`)",
                path.display(),
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn check_private(_path: &Path) -> io::Result<()> {
    Ok(())
}

/// Read a token file: the first line, trimmed. An empty file is an error.
pub fn read_token_file(path: &Path) -> io::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: the token file is empty", path.display()),
        ));
    }
    Ok(token)
}

/// The coordinator's token in `<state_dir>/token`: read it (refusing a file that group/others can
/// access), or create it on first start: 64 hex characters from OS randomness, written to a
/// temporary file with mode 0600, fsynced, then hard-linked to its final name (so a concurrent
/// start never sees a half-written token and never overwrites one).
pub fn load_or_create_token(state_dir: &Path) -> io::Result<String> {
    let path = token_path(state_dir);
    if path.exists() {
        check_private(&path)?;
        return read_token_file(&path);
    }
    // A directory made here holds the token: this user's only (one that exists is left as is).
    let mut dir = std::fs::DirBuilder::new();
    dir.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        dir.mode(0o700);
    }
    dir.create(state_dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", state_dir.display())))?;
    let token = generate_token()?;
    let tmp = state_dir.join(format!(".token.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", tmp.display())))?;
        f.write_all(token.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(d) = std::fs::File::open(state_dir) {
                let _ = d.sync_all();
            }
            Ok(token)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            check_private(&path)?;
            read_token_file(&path)
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// The client-side token: `file` if given (an error reading it is returned), else `HERD_TOKEN`
/// if set and non-empty, else `Ok(None)`.
pub fn try_token_from_env_or_file(file: Option<&Path>) -> io::Result<Option<String>> {
    if let Some(f) = file {
        // A token file is a credential wherever it comes from: the same rule as the state
        // dir's own token (and ssh's for keys).
        check_private(f)?;
        return read_token_file(f).map(Some);
    }
    match std::env::var(TOKEN_ENV) {
        Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
        _ => Ok(None),
    }
}

/// [`try_token_from_env_or_file`] that prints a failure to read `file` on stderr and gives None.
pub fn token_from_env_or_file(file: Option<&Path>) -> Option<String> {
    match try_token_from_env_or_file(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("herd: cannot read the token: {e}");
            None
        }
    }
}

/// The shortest token a server (coordinator, `herd serve`) accepts to enforce: its own are 64
/// hex characters; a short one given by hand can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// Refuse to serve behind a token shorter than [`MIN_TOKEN_LEN`].
pub fn check_strength(token: &str, source: &str) -> io::Result<()> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{source}: the token has {} characters, fewer than {MIN_TOKEN_LEN}: too easy to \
                 guess for a server (leave it out and one of 64 random hex characters is made)",
                token.len()
            ),
        ));
    }
    Ok(())
}

/// Compare two byte strings in time independent of where they differ (the length may leak).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// The server interceptor: requests without `authorization: Bearer <expected>` get
/// `UNAUTHENTICATED` before any handler runs.
pub fn check_bearer(
    expected: impl Into<String>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    let expected: Arc<[u8]> = Arc::from(expected.into().into_bytes());
    move |req: Request<()>| {
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ));
        };
        let Some(token) = value.as_bytes().strip_prefix(b"Bearer ") else {
            return Err(Status::unauthenticated(
                "the authorization metadata is not `Bearer <token>`",
            ));
        };
        if constant_time_eq(token.trim_ascii(), &expected) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
    }
}

/// The client interceptor: adds `authorization: Bearer <token>` to every call.
/// Use with `JobsClient::with_interceptor(channel, BearerToken::new(&token)?)`.
#[derive(Clone)]
pub struct BearerToken {
    header: MetadataValue<Ascii>,
}

impl BearerToken {
    pub fn new(token: &str) -> Result<Self, Status> {
        let header = format!("Bearer {}", token.trim())
            .parse::<MetadataValue<Ascii>>()
            .map_err(|_| {
                Status::invalid_argument("the token contains characters not allowed in metadata")
            })?;
        Ok(BearerToken { header })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(req)
    }
}

/// A function-style client interceptor, for callers that prefer a closure.
pub fn bearer_interceptor(
    token: &str,
) -> Result<
    impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static,
    Status,
> {
    let mut b = BearerToken::new(token)?;
    Ok(move |req| tonic::service::Interceptor::call(&mut b, req))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("herd-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn creates_once_with_mode_0600_and_reloads() {
        let d = tmpdir("create");
        let t = load_or_create_token(&d).unwrap();
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|c| c.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(token_path(&d))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(load_or_create_token(&d).unwrap(), t);
        assert_eq!(read_token_file(&token_path(&d)).unwrap(), t);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let fresh = d.join("fresh/state");
            load_or_create_token(&fresh).unwrap();
            let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
            std::fs::remove_dir_all(d.join("fresh")).unwrap();
        }
        // no temporary files left
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[cfg(unix)]
    #[test]
    fn refuses_group_readable_token() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("perm");
        load_or_create_token(&d).unwrap();
        std::fs::set_permissions(token_path(&d), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_token(&d).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[cfg(unix)]
    #[test]
    fn a_given_token_file_is_a_credential_too() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("given");
        let p = d.join("t");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = try_token_from_env_or_file(Some(&p)).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = try_token_from_env_or_file(Some(&p)).unwrap().unwrap();
        assert_eq!(t, "0123456789abcdef0123");
        check_strength(&t, "t").unwrap();
        let e = check_strength("a", "--token-file t").unwrap_err();
        assert!(e.to_string().contains("1 characters, fewer than 16"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn empty_token_file_is_an_error() {
        let d = tmpdir("empty");
        let p = d.join("t");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token_file(&p).is_err());
        assert!(try_token_from_env_or_file(Some(&p)).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn compare_and_interceptors() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        let check = check_bearer("secret");
        let mut client = BearerToken::new("secret").unwrap();
        let req = tonic::service::Interceptor::call(&mut client, Request::new(())).unwrap();
        assert!(check(req).is_ok());
        let mut wrong = BearerToken::new("secreT").unwrap();
        let req = tonic::service::Interceptor::call(&mut wrong, Request::new(())).unwrap();
        assert_eq!(check(req).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut f = bearer_interceptor("secret").unwrap();
        assert!(check(f(Request::new(())).unwrap()).is_ok());
    }
}
