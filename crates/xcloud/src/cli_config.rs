//! Where the tenant's commands find xcloudd and which key they call it with: a flag, else
//! an environment variable (XCLOUD_URL, XCLOUD_TOKEN, XCLOUD_SERVER_CERT), else the chosen
//! profile of the config file, else the local daemon's socket and the admin key beside it.
//! The file and its rules are in docs/cloud-api.md ("The CLI").

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use xcloud_control::client::Endpoint;

/// The variable naming xcloudd's URL.
pub const URL_VAR: &str = "XCLOUD_URL";
/// The variable holding the API key.
pub const TOKEN_VAR: &str = "XCLOUD_TOKEN";
/// The variable naming the certificate an https URL's server must present.
pub const SERVER_CERT_VAR: &str = "XCLOUD_SERVER_CERT";
/// The variable naming the profile.
pub const PROFILE_VAR: &str = "XCLOUD_PROFILE";
/// The variable naming the config file.
pub const CONFIG_VAR: &str = "XCLOUD_CONFIG";
/// The daemon of this machine, when nothing names another.
pub const LOCAL_SOCKET: &str = "/var/lib/xcloud/xcloudd.sock";

/// Why the CLI's configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading the config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a config file.
    #[error("the config file {} is not valid: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        source: Box<toml::de::Error>,
    },
    /// A profile was asked for that the file does not have.
    #[error("no profile {name:?} in {} (it has: {known}); `xcloud config ls` lists them", path.display())]
    NoProfile {
        /// The profile.
        name: String,
        /// The file.
        path: PathBuf,
        /// The profiles it has.
        known: String,
    },
    /// A URL xcloud cannot call.
    #[error("cannot call xcloudd at {url:?}: {why}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// A profile's token file could not be read.
    #[error("reading the token file {}: {source}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error("writing the config file {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Nowhere to keep a config file.
    #[error("no config file: set XCLOUD_CONFIG, XDG_CONFIG_HOME or HOME")]
    NoPlace,
    /// A profile with both a token and a token file.
    #[error("profile {0:?} would have both a token and a token file: give one")]
    TwoTokens(String),
}

/// The config file: profiles, each a daemon and a key, and which one is used by default.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The profile used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_profile: Option<String>,
    /// The profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// One daemon and the key to call it with. Relative paths are relative to the file's
/// directory.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// xcloudd's socket path (or `unix://PATH`) or `https://HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The API key itself (the file should then be readable by its owner only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The certificate (DER) an https URL's server must present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cert: Option<PathBuf>,
}

/// What the command line gave.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    /// `--url`.
    pub url: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--server-cert`.
    pub server_cert: Option<PathBuf>,
    /// `--profile`.
    pub profile: Option<String>,
}

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A flag.
    Flag,
    /// An environment variable.
    Env(&'static str),
    /// A profile of the config file.
    Profile(String),
    /// The admin key beside the local socket.
    AdminKey(PathBuf),
    /// The built-in default.
    Default,
    /// Nowhere: not set.
    Unset,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Flag => write!(f, "flag"),
            Self::Env(var) => write!(f, "${var}"),
            Self::Profile(name) => write!(f, "profile {name}"),
            Self::AdminKey(path) => write!(f, "{}", path.display()),
            Self::Default => write!(f, "default"),
            Self::Unset => write!(f, "not set"),
        }
    }
}

/// The daemon to call and the key to call it with, and where each came from.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Where the daemon answers.
    pub endpoint: Endpoint,
    /// The URL as given.
    pub url: String,
    /// Where the URL came from.
    pub url_from: Source,
    /// The API key.
    pub token: Option<String>,
    /// Where the key came from.
    pub token_from: Source,
    /// The profile in use, if any.
    pub profile: Option<String>,
    /// The config file read, if there was one.
    pub config_file: Option<PathBuf>,
    /// What the user should know (a key in a file others can read).
    pub warnings: Vec<String>,
}

/// The config file's path: $XCLOUD_CONFIG, else $XDG_CONFIG_HOME/xcloud/config.toml, else
/// ~/.config/xcloud/config.toml; with whether it was named explicitly.
pub fn config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<(PathBuf, bool)> {
    let set = |var: &str| env(var).filter(|v| !v.is_empty());
    if let Some(path) = set(CONFIG_VAR) {
        return Some((PathBuf::from(path), true));
    }
    let base = set("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| set("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some((base.join("xcloud").join("config.toml"), false))
}

/// Reads the config file; a missing file is an empty one unless `must_exist`.
pub fn load(path: &Path, must_exist: bool) -> Result<Option<ConfigFile>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    toml::from_str(&text).map(Some).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// Writes the config file whole, readable by its owner only (it may hold keys), through a
/// temporary file renamed over it so a crash leaves the old file or the new one.
pub fn save(path: &Path, config: &ConfigFile) -> Result<(), ConfigError> {
    let failed = |source| ConfigError::Write {
        path: path.to_path_buf(),
        source,
    };
    let text = toml::to_string(config).map_err(|e| failed(std::io::Error::other(e)))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(failed)?;
    }
    let mut temp_name = path.as_os_str().to_owned();
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = PathBuf::from(temp_name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(failed(e));
    }
    Ok(())
}

/// Resolves the daemon and key from the flags, the environment (`env`) and the config file.
/// A profile's key goes only to its own URL: with the URL from a flag or the environment,
/// the key must come from one too (or, for the local socket, the admin key beside it).
pub fn resolve(flags: &Flags, env: &dyn Fn(&str) -> Option<String>) -> Result<Resolved, ConfigError> {
    let set = |var: &str| env(var).filter(|v| !v.is_empty());
    let mut warnings = Vec::new();
    let path = config_path(env);
    let config = match &path {
        Some((path, explicit)) => load(path, *explicit)?.map(|c| (path.clone(), c)),
        None => None,
    };
    let profile_name = flags.profile.clone().or_else(|| set(PROFILE_VAR));
    let asked = profile_name.is_some();
    let profile_name = profile_name.or_else(|| config.as_ref().and_then(|(_, c)| c.default_profile.clone()));
    let (profile, base) = match (&profile_name, &config) {
        (Some(name), Some((path, c))) => match c.profiles.get(name) {
            Some(p) => (Some(p.clone()), path.parent().map(Path::to_path_buf)),
            None => return Err(no_profile(name, path, c)),
        },
        (Some(name), None) if asked => {
            let path = path.map(|(p, _)| p).unwrap_or_default();
            return Err(no_profile(name, &path, &ConfigFile::default()));
        }
        _ => (None, None),
    };
    let relative = |p: &Path| match &base {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    };
    let from_profile = || Source::Profile(profile_name.clone().unwrap_or_default());

    let (url, url_from) = if let Some(url) = flags.url.clone() {
        (url, Source::Flag)
    } else if let Some(url) = set(URL_VAR) {
        (url, Source::Env(URL_VAR))
    } else if let Some(url) = profile.as_ref().and_then(|p| p.url.clone()) {
        (url, from_profile())
    } else {
        (LOCAL_SOCKET.to_string(), Source::Default)
    };
    let profile_url = matches!(url_from, Source::Profile(_)) || (profile.is_some() && url_from == Source::Default);
    let server_cert = flags
        .server_cert
        .clone()
        .or_else(|| set(SERVER_CERT_VAR).map(PathBuf::from))
        .or_else(|| {
            profile
                .as_ref()
                .filter(|_| profile_url)
                .and_then(|p| p.server_cert.as_deref().map(relative))
        });
    let identity = |p: &Path| p.to_path_buf();
    let endpoint = endpoint_of(&url, server_cert, if profile_url { &relative } else { &identity })?;

    let (mut token, mut token_from) = if let Some(token) = flags.token.clone() {
        (Some(token), Source::Flag)
    } else if let Some(token) = set(TOKEN_VAR) {
        (Some(token), Source::Env(TOKEN_VAR))
    } else {
        (None, Source::Unset)
    };
    if token.is_none() && profile_url {
        if let (Some(p), Some((file, _))) = (&profile, &config) {
            if let Some(t) = &p.token {
                warn_if_others_read(file, "holds a token", &mut warnings);
                (token, token_from) = (Some(t.clone()), from_profile());
            } else if let Some(f) = &p.token_file {
                let f = relative(f);
                let text = std::fs::read_to_string(&f).map_err(|source| ConfigError::TokenFile {
                    path: f.clone(),
                    source,
                })?;
                warn_if_others_read(&f, "is a token file", &mut warnings);
                (token, token_from) = (Some(text.trim().to_string()), from_profile());
            }
        }
    }
    if token.is_none() {
        if let Endpoint::Unix(sock) = &endpoint {
            if let Some(file) = sock.parent().map(|d| d.join("admin.key")) {
                if let Ok(key) = std::fs::read_to_string(&file) {
                    (token, token_from) = (Some(key.trim().to_string()), Source::AdminKey(file));
                }
            }
        }
    }
    Ok(Resolved {
        endpoint,
        url,
        url_from,
        token,
        token_from,
        profile: profile.and(profile_name),
        config_file: config.map(|(path, _)| path),
        warnings,
    })
}

/// Changes the config file (an empty one if there is none yet) and writes it back; returns
/// its path.
pub fn edit(
    env: &dyn Fn(&str) -> Option<String>,
    change: impl FnOnce(&mut ConfigFile, &Path) -> Result<(), ConfigError>,
) -> Result<PathBuf, ConfigError> {
    let (path, _) = config_path(env).ok_or(ConfigError::NoPlace)?;
    let mut config = load(&path, false)?.unwrap_or_default();
    change(&mut config, &path)?;
    save(&path, &config)?;
    Ok(path)
}

/// Sets the fields of `name` that `change` has (creating the profile); a token replaces a
/// token file and the other way round.
pub fn set_profile(
    config: &mut ConfigFile,
    name: &str,
    change: Profile,
    make_default: bool,
) -> Result<(), ConfigError> {
    if change.token.is_some() && change.token_file.is_some() {
        return Err(ConfigError::TwoTokens(name.to_string()));
    }
    let profile = config.profiles.entry(name.to_string()).or_default();
    if change.url.is_some() {
        profile.url = change.url;
    }
    if change.server_cert.is_some() {
        profile.server_cert = change.server_cert;
    }
    if change.token.is_some() {
        (profile.token, profile.token_file) = (change.token, None);
    }
    if change.token_file.is_some() {
        (profile.token_file, profile.token) = (change.token_file, None);
    }
    if make_default || config.default_profile.is_none() {
        config.default_profile = Some(name.to_string());
    }
    Ok(())
}

/// Makes `name` the default profile.
pub fn use_profile(config: &mut ConfigFile, name: &str, path: &Path) -> Result<(), ConfigError> {
    if !config.profiles.contains_key(name) {
        return Err(no_profile(name, path, config));
    }
    config.default_profile = Some(name.to_string());
    Ok(())
}

/// Removes `name` (and, if it was the default, the default).
pub fn remove_profile(config: &mut ConfigFile, name: &str, path: &Path) -> Result<(), ConfigError> {
    if config.profiles.remove(name).is_none() {
        return Err(no_profile(name, path, config));
    }
    if config.default_profile.as_deref() == Some(name) {
        config.default_profile = None;
    }
    Ok(())
}

/// The URL as a profile keeps it: checked, and a relative socket path made absolute.
pub fn profile_url(url: &str) -> Result<String, ConfigError> {
    let identity = |p: &Path| p.to_path_buf();
    match endpoint_of(url, Some(PathBuf::new()), &identity)? {
        Endpoint::Unix(path) if path.is_relative() => {
            Ok(std::path::absolute(&path).unwrap_or(path).display().to_string())
        }
        _ => Ok(url.to_string()),
    }
}

/// A key shown without giving it away: its first and last four characters.
pub fn token_hint(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    if chars.len() < 16 {
        return "(set)".into();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

fn no_profile(name: &str, path: &Path, config: &ConfigFile) -> ConfigError {
    let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
    ConfigError::NoProfile {
        name: name.to_string(),
        path: path.to_path_buf(),
        known: if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        },
    }
}

/// The endpoint a URL names: a socket path (or `unix://PATH`), or `https://HOST:PORT` with the
/// server's certificate.
fn endpoint_of(
    url: &str,
    server_cert: Option<PathBuf>,
    relative: &dyn Fn(&Path) -> PathBuf,
) -> Result<Endpoint, ConfigError> {
    let bad = |why: &str| ConfigError::BadUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    if let Some(addr) = url.strip_prefix("https://") {
        let addr = addr.trim_end_matches('/');
        if addr.is_empty() || addr.contains('/') {
            return Err(bad("an https URL is https://HOST:PORT, with no path"));
        }
        let server_cert = server_cert.ok_or_else(|| {
            bad("an https URL needs the server's certificate (--server-cert, XCLOUD_SERVER_CERT or the profile's server_cert: the server identity's cert.der)")
        })?;
        return Ok(Endpoint::Tls {
            addr: addr.to_string(),
            server_cert,
        });
    }
    if url.starts_with("http://") {
        return Err(bad(
            "xcloudd serves TCP only over TLS: use https://HOST:PORT with its certificate, or the Unix socket's path",
        ));
    }
    let path = match url.strip_prefix("unix://") {
        Some(path) => path,
        None if url.contains("://") => return Err(bad("the URL is a socket path, unix://PATH or https://HOST:PORT")),
        None => url,
    };
    if path.is_empty() {
        return Err(bad("the socket path is empty"));
    }
    Ok(Endpoint::Unix(relative(Path::new(path))))
}

fn warn_if_others_read(file: &Path, what: &str, warnings: &mut Vec<String>) {
    if let Ok(meta) = std::fs::metadata(file) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "{} {what} and others can read it (mode {:o}): chmod 600 {}",
                file.display(),
                mode & 0o777,
                file.display()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("xcloud-config-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn env_of(vars: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        move |k| map.get(k).cloned()
    }

    fn write_config(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("config.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    const TWO: &str = r#"
default_profile = "lab"
[profiles.lab]
url = "https://10.0.0.1:7443"
token = "xck_lab"
server_cert = "lab.der"
[profiles.home]
url = "unix://socks/x.sock"
token_file = "home.key"
"#;

    #[test]
    fn nothing_configured_is_the_local_socket() {
        let r = resolve(&Flags::default(), &env_of(&[])).unwrap();
        assert_eq!(r.url, LOCAL_SOCKET);
        assert_eq!(r.url_from, Source::Default);
        assert!(r.config_file.is_none() && r.profile.is_none());
        assert!(matches!(r.endpoint, Endpoint::Unix(p) if p == Path::new(LOCAL_SOCKET)));
    }

    #[test]
    fn the_default_profile_then_env_then_flags_win() {
        let s = Scratch::new("order");
        let path = write_config(&s.0, TWO);
        let cfg = (CONFIG_VAR, path.display().to_string());
        let r = resolve(&Flags::default(), &env_of(std::slice::from_ref(&cfg))).unwrap();
        assert_eq!(r.profile.as_deref(), Some("lab"));
        assert_eq!(r.token.as_deref(), Some("xck_lab"));
        assert_eq!(r.token_from, Source::Profile("lab".into()));
        match &r.endpoint {
            Endpoint::Tls { addr, server_cert } => {
                assert_eq!(addr, "10.0.0.1:7443");
                assert_eq!(server_cert, &s.0.join("lab.der"), "relative to the file");
            }
            other => panic!("{other:?}"),
        }
        let env = env_of(&[cfg.clone(), (TOKEN_VAR, "xck_env".into())]);
        assert_eq!(
            resolve(&Flags::default(), &env).unwrap().token.as_deref(),
            Some("xck_env")
        );
        let flags = Flags {
            token: Some("xck_flag".into()),
            ..Flags::default()
        };
        let r = resolve(&flags, &env).unwrap();
        assert_eq!((r.token.as_deref(), r.token_from), (Some("xck_flag"), Source::Flag));
    }

    #[test]
    fn a_named_profile_reads_its_token_file() {
        let s = Scratch::new("file");
        let path = write_config(&s.0, TWO);
        std::fs::write(s.0.join("home.key"), "xck_home\n").unwrap();
        std::fs::set_permissions(s.0.join("home.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let env = env_of(&[(CONFIG_VAR, path.display().to_string()), (PROFILE_VAR, "home".into())]);
        let r = resolve(&Flags::default(), &env).unwrap();
        assert_eq!(r.token.as_deref(), Some("xck_home"));
        assert!(matches!(&r.endpoint, Endpoint::Unix(p) if p == &s.0.join("socks/x.sock")));
        assert_eq!(r.warnings.len(), 1, "a token file others can read: {:?}", r.warnings);
    }

    #[test]
    fn a_profiles_token_never_goes_to_another_url() {
        let s = Scratch::new("leak");
        let path = write_config(&s.0, TWO);
        let env = env_of(&[
            (CONFIG_VAR, path.display().to_string()),
            (URL_VAR, "https://evil:1".into()),
            (SERVER_CERT_VAR, "/x.der".into()),
        ]);
        let r = resolve(&Flags::default(), &env).unwrap();
        assert_eq!(r.token, None);
        assert_eq!(r.token_from, Source::Unset);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let s = Scratch::new("bad");
        let cfg = |text: &str| {
            let path = write_config(&s.0, text);
            vec![(CONFIG_VAR, path.display().to_string())]
        };
        let err = |vars: Vec<(&str, String)>, flags: &Flags| resolve(flags, &env_of(&vars)).unwrap_err().to_string();
        assert!(err(cfg("[profiles.a]\nurl = 3\n"), &Flags::default()).contains("not valid"));
        assert!(err(cfg("[profiles.a]\nuri = \"x\"\n"), &Flags::default()).contains("unknown field"));
        assert!(err(cfg("default_profile = \"b\"\n[profiles.a]\n"), &Flags::default()).contains("no profile \"b\""));
        let mut vars = cfg(TWO);
        vars.push((PROFILE_VAR, "nope".into()));
        assert!(err(vars, &Flags::default()).contains("it has: home, lab"));
        let url = |u: &str| Flags {
            url: Some(u.into()),
            ..Flags::default()
        };
        assert!(err(vec![], &url("http://h:1")).contains("only over TLS"));
        assert!(err(vec![], &url("https://h:1")).contains("certificate"));
        assert!(err(vec![], &url("ftp://h")).contains("socket path"));
        let missing = vec![(CONFIG_VAR, s.0.join("none.toml").display().to_string())];
        assert!(err(missing, &Flags::default()).contains("reading the config file"));
        let mut vars = cfg(TWO);
        vars.push((PROFILE_VAR, "home".into()));
        assert!(
            err(vars, &Flags::default()).contains("token file"),
            "home.key is missing"
        );
    }

    #[test]
    fn profiles_are_set_used_and_removed() {
        let s = Scratch::new("edit");
        let env = env_of(&[("XDG_CONFIG_HOME", s.0.display().to_string())]);
        let path = edit(&env, |c, _| {
            let p = Profile {
                url: Some("https://a:1".into()),
                token: Some("xck_1".into()),
                ..Profile::default()
            };
            set_profile(c, "a", p, false)
        })
        .unwrap();
        assert_eq!(path, s.0.join("xcloud/config.toml"));
        edit(&env, |c, _| {
            let p = Profile {
                token_file: Some("/k".into()),
                ..Profile::default()
            };
            set_profile(c, "a", p, false)?;
            set_profile(c, "b", Profile::default(), false)
        })
        .unwrap();
        let c = load(&path, true).unwrap().unwrap();
        let a = &c.profiles["a"];
        assert_eq!((a.url.as_deref(), a.token.as_deref()), (Some("https://a:1"), None));
        assert_eq!(a.token_file.as_deref(), Some(Path::new("/k")));
        assert_eq!(c.default_profile.as_deref(), Some("a"), "the first profile set");
        edit(&env, |c, p| use_profile(c, "b", p)).unwrap();
        edit(&env, |c, p| remove_profile(c, "b", p)).unwrap();
        let c = load(&path, true).unwrap().unwrap();
        assert_eq!((c.default_profile, c.profiles.len()), (None, 1));
        assert!(edit(&env, |c, p| use_profile(c, "zz", p)).is_err());
        let both = Profile {
            token: Some("t".into()),
            token_file: Some("f".into()),
            ..Profile::default()
        };
        assert!(edit(&env, |c, _| set_profile(c, "a", both, false)).is_err());
        assert_eq!(token_hint("xck_0123456789abcdef"), "xck_…cdef");
        assert_eq!(token_hint("short"), "(set)");
    }

    #[test]
    fn save_writes_a_file_only_its_owner_reads() {
        let s = Scratch::new("save");
        let path = s.0.join("sub/config.toml");
        let mut config = ConfigFile::default();
        config.profiles.insert(
            "a".into(),
            Profile {
                url: Some("https://h:1".into()),
                token: Some("xck_a".into()),
                ..Profile::default()
            },
        );
        config.default_profile = Some("a".into());
        save(&path, &config).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let back = load(&path, true).unwrap().unwrap();
        assert_eq!(back.profiles, config.profiles);
        assert_eq!(back.default_profile.as_deref(), Some("a"));
    }
}
