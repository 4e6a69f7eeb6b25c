//! Who a TCP caller is and what it may call: the two roles, the credentials that give them
//! (bearer tokens compared in constant time; with mutual TLS, the client certificate's subject),
//! and the methods each role may call. The Unix socket (mode 0600, root only) is always admin and
//! never passes through here.

use std::{
    collections::HashMap,
    fmt,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
};

use anyhow::Context as _;
use tonic::Status;

/// What a caller may do. `Check < Admin`: of two credentials, the lesser role applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `RateLimiter.Check`, `RateLimiter.CheckBatch`, health and reflection only.
    Check,
    /// Every method.
    Admin,
}

/// The methods the check role may call, beside every method of the health and reflection
/// services.
const CHECK_ROLE_METHODS: [&str; 2] = [
    "/limiter.v1.RateLimiter/Check",
    "/limiter.v1.RateLimiter/CheckBatch",
];
const CHECK_ROLE_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Check => "check",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may call the gRPC method at `path` (`/package.Service/Method`).
    pub fn allows(self, path: &str) -> bool {
        match self {
            Role::Admin => true,
            Role::Check => {
                CHECK_ROLE_METHODS.contains(&path)
                    || CHECK_ROLE_SERVICES.iter().any(|s| path.starts_with(s))
            }
        }
    }

    /// The PERMISSION_DENIED answer to a call of `path` this role may not make.
    pub fn denied(self, path: &str) -> Status {
        let method = path.trim_start_matches('/');
        Status::permission_denied(format!(
            "the {} role may not call {method}: it may call RateLimiter.Check, \
             RateLimiter.CheckBatch, health and reflection only; other methods need the admin \
             credential",
            self.as_str()
        ))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a TCP caller is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    /// The client certificate's subject (mutual TLS only), as `CN=..., O=...`.
    pub subject: Option<Arc<str>>,
}

/// A mistake in the API's credential options, found at start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    #[error("the admin and the check token are the same: give the check role a token of its own")]
    SameToken,
    #[error(
        "certificate subject {0:?} is given both --api-admin-subject and --api-check-subject: give it one role"
    )]
    SubjectInBothRoles(String),
    #[error("--api-admin-subject and --api-check-subject need mutual TLS (--api-tls-client-ca)")]
    SubjectsWithoutMutualTls,
    #[error("an empty certificate subject was given to --api-admin-subject or --api-check-subject")]
    EmptySubject,
}

/// What the TCP listener accepts, and the role each credential gives.
#[derive(Clone)]
pub struct Credentials {
    admin_token: Option<Arc<[u8]>>,
    check_token: Option<Arc<[u8]>>,
    /// Clients must present a certificate of the client CA (rustls enforces it in the handshake).
    mutual_tls: bool,
    /// With mutual TLS: the role of each certificate common name. Empty: every certificate of
    /// the client CA is admin (as before roles existed).
    subjects: Arc<HashMap<String, Role>>,
}

impl Credentials {
    pub fn new(
        admin_token: Option<&str>,
        check_token: Option<&str>,
        mutual_tls: bool,
        admin_subjects: &[String],
        check_subjects: &[String],
    ) -> Result<Credentials, CredentialsError> {
        if let (Some(a), Some(c)) = (admin_token, check_token)
            && a == c
        {
            return Err(CredentialsError::SameToken);
        }
        let any_subject = !admin_subjects.is_empty() || !check_subjects.is_empty();
        if any_subject && !mutual_tls {
            return Err(CredentialsError::SubjectsWithoutMutualTls);
        }
        let mut subjects = HashMap::new();
        for (names, role) in [(admin_subjects, Role::Admin), (check_subjects, Role::Check)] {
            for name in names {
                if name.trim().is_empty() {
                    return Err(CredentialsError::EmptySubject);
                }
                if subjects
                    .insert(name.clone(), role)
                    .is_some_and(|r| r != role)
                {
                    return Err(CredentialsError::SubjectInBothRoles(name.clone()));
                }
            }
        }
        let bytes = |t: &str| Arc::<[u8]>::from(t.as_bytes());
        Ok(Credentials {
            admin_token: admin_token.map(bytes),
            check_token: check_token.map(bytes),
            mutual_tls,
            subjects: Arc::new(subjects),
        })
    }

    /// Whether TCP callers must authenticate somehow (the agent never serves TCP otherwise).
    pub fn any(&self) -> bool {
        self.admin_token.is_some() || self.check_token.is_some() || self.mutual_tls
    }

    /// The caller's identity from its `authorization` header and its certificate (DER), or
    /// UNAUTHENTICATED (no or a wrong credential) or PERMISSION_DENIED (a certificate of the
    /// CA whose subject has no role). Every configured kind of credential must be presented; the
    /// caller gets the lesser of the roles they give.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certificate: Option<&[u8]>,
    ) -> Result<Identity, Status> {
        let mut role = None::<Role>;
        let mut lesser = |r: Role| role = Some(role.map_or(r, |old| old.min(r)));
        if self.admin_token.is_some() || self.check_token.is_some() {
            let given = authorization
                .and_then(|v| v.strip_prefix(b"Bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated(
                        "missing credentials: send `authorization: Bearer <token>`",
                    )
                })?;
            // Both compared, always: the time taken does not tell which token was close.
            let admin = self
                .admin_token
                .as_ref()
                .is_some_and(|t| constant_time_eq(given, t));
            let check = self
                .check_token
                .as_ref()
                .is_some_and(|t| constant_time_eq(given, t));
            match (admin, check) {
                (true, _) => lesser(Role::Admin),
                (false, true) => lesser(Role::Check),
                (false, false) => return Err(Status::unauthenticated("invalid bearer token")),
            }
        }
        let mut subject = None;
        if self.mutual_tls {
            let der = certificate.ok_or_else(|| {
                Status::unauthenticated("missing credentials: no client certificate")
            })?;
            let (dn, common_name) = crate::certificate::subject(der).map_err(|e| {
                Status::unauthenticated(format!("unreadable client certificate: {e}"))
            })?;
            if self.subjects.is_empty() {
                lesser(Role::Admin);
            } else {
                match common_name.as_deref().and_then(|cn| self.subjects.get(cn)) {
                    Some(r) => lesser(*r),
                    None => {
                        return Err(Status::permission_denied(format!(
                            "the client certificate's subject {dn:?} has no role: name its \
                             common name with --api-admin-subject or --api-check-subject"
                        )));
                    }
                }
            }
            subject = Some(Arc::from(dn));
        }
        let role = role.ok_or_else(|| Status::unauthenticated("the TCP API takes no callers"))?;
        Ok(Identity { role, subject })
    }
}

/// Compares a presented secret with the expected one without an early exit on the first
/// differing byte (`subtle`'s constant-time comparison; the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.ct_eq(b).into()
}

/// Reads a token file: the token is its content without surrounding whitespace; it must not be
/// empty and the file must not be readable by others.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("token file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "token file {} is readable by group or others (mode {:o}): chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        anyhow::bail!(
            "token file {} is empty: write a token of at least 16 characters into it",
            path.display()
        );
    }
    if token.len() < 16 {
        anyhow::bail!(
            "token file {}: the token must be at least 16 characters",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Reads the admin (`--api-token-file`) and check (`--api-check-token-file`) tokens; one file
/// for both, or two files with the same token, is an error (a caller's role would be
/// ambiguous).
pub fn read_tokens(
    admin: Option<&Path>,
    check: Option<&Path>,
) -> anyhow::Result<(Option<String>, Option<String>)> {
    if let (Some(a), Some(c)) = (admin, check) {
        let same = |x: &Path, y: &Path| -> anyhow::Result<bool> {
            let (x, y) = (std::fs::metadata(x)?, std::fs::metadata(y)?);
            Ok(x.dev() == y.dev() && x.ino() == y.ino())
        };
        if same(a, c).unwrap_or(false) {
            anyhow::bail!(
                "--api-token-file and --api-check-token-file are the same file ({}): the check role needs a token of its own",
                c.display()
            );
        }
    }
    let admin_token = admin.map(read_token).transpose()?;
    let check_token = check.map(read_token).transpose()?;
    if admin_token.is_some() && admin_token == check_token {
        anyhow::bail!(
            "--api-token-file {} and --api-check-token-file {} hold the same token: the check role needs a token of its own",
            admin
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default(),
            check
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        );
    }
    Ok((admin_token, check_token))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use tonic::Code;

    use super::*;

    const ADMIN: &str = "admin-token-0123456789";
    const CHECK: &str = "check-token-0123456789";

    fn bearer(t: &str) -> Vec<u8> {
        format!("Bearer {t}").into_bytes()
    }

    #[test]
    fn the_check_role_may_check_and_probe_but_nothing_else() {
        for path in [
            "/limiter.v1.RateLimiter/Check",
            "/limiter.v1.RateLimiter/CheckBatch",
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(Role::Check.allows(path), "{path}");
            assert!(Role::Admin.allows(path), "{path}");
        }
        for path in [
            "/limiter.v1.Limits/Set",
            "/limiter.v1.Limits/Delete",
            "/limiter.v1.Limits/List",
            "/limiter.v1.Limits/Watch",
            "/limiter.v1.Stats/Global",
            "/limiter.v1.Stats/Client",
            "/limiter.v1.Stats/Top",
            "/limiter.v1.Cluster/Status",
            "/limiter.v1.Cluster/Forget",
            "/limiter.v1.RateLimiter/CheckBatchX",
            "/limiter.v1.RateLimiter/Check/",
            "/grpc.health.v1.HealthX/Check",
            "/grpc.reflection.v1beta.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(!Role::Check.allows(path), "{path}");
            assert!(Role::Admin.allows(path), "{path}");
        }
        let status = Role::Check.denied("/limiter.v1.Limits/Set");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            status
                .message()
                .starts_with("the check role may not call limiter.v1.Limits/Set"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn each_token_gives_its_role_and_anything_else_is_unauthenticated() {
        let c = Credentials::new(Some(ADMIN), Some(CHECK), false, &[], &[]).unwrap();
        let role = |h: Option<&[u8]>| c.authenticate(h, None).map(|i| i.role);
        assert_eq!(role(Some(&bearer(ADMIN))).unwrap(), Role::Admin);
        assert_eq!(role(Some(&bearer(CHECK))).unwrap(), Role::Check);
        for bad in [
            None,
            Some(bearer("wrong-token-0123456789")),
            Some(bearer(&ADMIN[..ADMIN.len() - 1])),
            Some(ADMIN.as_bytes().to_vec()),
            Some(format!("bearer {ADMIN}").into_bytes()),
        ] {
            let e = role(bad.as_deref()).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{bad:?}: {e:?}");
        }
        // Only a check token: admin calls are for the Unix socket alone.
        let c = Credentials::new(None, Some(CHECK), false, &[], &[]).unwrap();
        assert_eq!(
            c.authenticate(Some(&bearer(CHECK)), None).unwrap().role,
            Role::Check
        );
        assert!(c.authenticate(Some(&bearer(ADMIN)), None).is_err());
    }

    #[test]
    fn bad_credential_options_are_refused() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            Credentials::new(Some(ADMIN), Some(ADMIN), false, &[], &[]).err(),
            Some(CredentialsError::SameToken)
        );
        assert_eq!(
            Credentials::new(Some(ADMIN), None, false, &s(&["ops"]), &[]).err(),
            Some(CredentialsError::SubjectsWithoutMutualTls)
        );
        assert_eq!(
            Credentials::new(None, None, true, &s(&["ops"]), &s(&["web", "ops"])).err(),
            Some(CredentialsError::SubjectInBothRoles("ops".into()))
        );
        assert_eq!(
            Credentials::new(None, None, true, &s(&[" "]), &[]).err(),
            Some(CredentialsError::EmptySubject)
        );
        // The same subject twice in one role is fine.
        assert!(Credentials::new(None, None, true, &s(&["ops", "ops"]), &[]).is_ok());
    }

    /// A self-signed certificate with this common name, as DER.
    fn certificate(common_name: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn certificate_subjects_map_to_roles_and_the_lesser_role_wins() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = Credentials::new(None, None, true, &s(&["ops"]), &s(&["web"])).unwrap();
        let ops = certificate("ops");
        let web = certificate("web");
        let other = certificate("intruder");
        let id = c.authenticate(None, Some(&ops)).unwrap();
        assert_eq!(id.role, Role::Admin);
        let subject = id.subject.unwrap();
        assert!(subject.contains("CN=ops"), "{subject}");
        assert_eq!(c.authenticate(None, Some(&web)).unwrap().role, Role::Check);
        let e = c.authenticate(None, Some(&other)).unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("CN=intruder"), "{}", e.message());
        assert_eq!(
            c.authenticate(None, None).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            c.authenticate(None, Some(b"not a certificate"))
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
        // Without subject roles, any certificate of the CA is admin (as before roles).
        let c = Credentials::new(None, None, true, &[], &[]).unwrap();
        assert_eq!(
            c.authenticate(None, Some(&other)).unwrap().role,
            Role::Admin
        );
        // A token and a certificate: both needed, the lesser role applies.
        let c =
            Credentials::new(Some(ADMIN), Some(CHECK), true, &s(&["ops"]), &s(&["web"])).unwrap();
        assert_eq!(
            c.authenticate(Some(&bearer(ADMIN)), Some(&web))
                .unwrap()
                .role,
            Role::Check
        );
        assert_eq!(
            c.authenticate(Some(&bearer(CHECK)), Some(&ops))
                .unwrap()
                .role,
            Role::Check
        );
        assert_eq!(
            c.authenticate(Some(&bearer(ADMIN)), Some(&ops))
                .unwrap()
                .role,
            Role::Admin
        );
        assert_eq!(
            c.authenticate(None, Some(&ops)).unwrap_err().code(),
            Code::Unauthenticated
        );
    }

    #[test]
    fn token_files_must_differ_and_hold_a_token() {
        let dir = std::env::temp_dir().join(format!("limiter-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p
        };
        let admin = write("admin", ADMIN);
        let check = write("check", &format!("{CHECK}\n"));
        let copy = write("copy", ADMIN);
        let empty = write("empty", " \n");
        let (a, c) = read_tokens(Some(&admin), Some(&check)).unwrap();
        assert_eq!((a.as_deref(), c.as_deref()), (Some(ADMIN), Some(CHECK)));
        let e = read_tokens(Some(&admin), Some(&admin)).unwrap_err();
        assert!(e.to_string().contains("are the same file"), "{e}");
        let e = read_tokens(Some(&admin), Some(&copy)).unwrap_err();
        assert!(e.to_string().contains("hold the same token"), "{e}");
        let e = read_tokens(None, Some(&empty)).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
