//! The registry client against a real registry: Debian's `docker-registry`
//! on loopback, with htpasswd (Basic) authentication, and an image pushed
//! to it by the real Docker engine (`scripts/setup` installs both). The
//! Bearer flow (Docker Hub, GHCR, Harbor) runs through a token gate in
//! front of the same registry: it answers 401 with a Bearer challenge,
//! hands out a token for the right Basic credentials, and forwards
//! requests that carry it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faultbox_engine::registry::{Registries, RegistryError, docker_auths};

struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A registry with user `tester`, password `s3cret`.
fn registry() -> Registry {
    assert!(
        Path::new("/usr/bin/docker-registry").is_file(),
        "docker-registry is missing (scripts/setup installs the Debian package)"
    );
    let dir = std::env::temp_dir().join(format!("fb-registry-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("store")).expect("dir");
    // bcrypt, the only hash docker-registry's htpasswd reads.
    let hash = run(Command::new("python3").args([
        "-c",
        "import crypt; print(crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH)))",
    ]));
    std::fs::write(dir.join("htpasswd"), format!("tester:{}\n", hash.trim())).expect("htpasswd");
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = format!(
        "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {store}}}}}\nhttp: {{addr: \"{addr}\"}}\nauth: {{htpasswd: {{realm: faultbox-test, path: {pw}}}}}\n",
        store = dir.join("store").display(),
        pw = dir.join("htpasswd").display(),
    );
    std::fs::write(dir.join("config.yml"), config).expect("config");
    let child = Command::new("/usr/bin/docker-registry")
        .args(["serve", &dir.join("config.yml").to_string_lossy()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).expect("log"))
        .spawn()
        .expect("docker-registry");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "docker-registry did not listen: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry { child, addr, dir }
}

/// Builds a small image (FROM scratch: one file, an entrypoint, a
/// command and a user) and pushes it as `<registry>/team/http:v1` with the
/// Docker client config that `push_with_password` logged in with,
/// returning that config's `config.json` and the digest the push printed.
fn push(reg: &Registry) -> (String, String) {
    let ctx = reg.dir.join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("server"), "not a real program\n").expect("file");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY server /server\nUSER 65532:65532\nENTRYPOINT [\"/server\", \"--port\"]\nCMD [\"8080\"]\n",
    )
    .expect("Dockerfile");
    let image = format!("faultbox-registry-test:{}", std::process::id());
    assert!(
        Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .output()
            .is_ok_and(|o| o.status.success()),
        "Docker is not reachable (scripts/setup installs docker.io and starts dockerd)"
    );
    run(Command::new("docker").args(["build", "-q", "-t", &image, &ctx.to_string_lossy()]));
    let cfg = reg.dir.join("docker");
    let docker = || {
        let mut c = Command::new("docker");
        c.env("DOCKER_CONFIG", &cfg);
        c
    };
    let target = format!("{}/team/http:v1", reg.addr);
    run(docker().args(["tag", &image, &target]));
    let out = run(docker().args(["push", &target]));
    let _ = Command::new("docker")
        .args(["rmi", &target, &image])
        .output();
    // A multi-platform index pointing at it, as most public images are.
    let index = format!("{}/team/multi:v1", reg.addr);
    run(docker().args(["manifest", "create", "--insecure", &index, &target]));
    run(docker().args(["manifest", "push", "--insecure", "--purge", &index]));
    let digest = out
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .expect("the push's digest")
        .to_string();
    let config = std::fs::read_to_string(cfg.join("config.json")).expect("config.json");
    (config, digest)
}

fn lookup(
    reg: &Registries,
    image: &str,
) -> Result<faultbox_engine::registry::ImageConfig, RegistryError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(reg.config(image))
}

#[test]
fn image_configs_come_from_a_real_registry() {
    let reg = registry();
    let (docker_config, pushed) = push_with_password(&reg);
    let auths = docker_auths(&docker_config).expect("Docker's own config.json");
    let image = format!("{}/team/http:v1", reg.addr);

    // Basic authentication with the credentials `docker login` stored.
    let with = Registries {
        insecure: vec![],
        auths: auths.clone(),
    };
    let config = lookup(&with, &image).expect("the image config");
    assert_eq!(config.entrypoint, ["/server", "--port"]);
    assert_eq!(config.cmd, ["8080"]);
    assert_eq!(config.user, "65532:65532");
    assert_eq!(config.digest, pushed);
    // An index resolves to this machine's platform, whose digest it is.
    let multi = lookup(&with, &format!("{}/team/multi:v1", reg.addr)).expect("through the index");
    assert_eq!(multi.entrypoint, config.entrypoint);
    assert_eq!(multi.digest, pushed);
    // By digest, too.
    let pinned = lookup(&with, &format!("{}/team/http@{pushed}", reg.addr)).expect("by digest");
    assert_eq!(pinned.entrypoint, config.entrypoint);

    // No credentials, or wrong ones: refused, naming what to give.
    let none = Registries::default();
    let e = lookup(&none, &image)
        .expect_err("no credentials")
        .to_string();
    assert!(
        e.contains("imagePullSecret") && e.contains("team/http"),
        "{e}"
    );
    let wrong = Registries {
        insecure: vec![],
        auths: [(reg.addr.to_string(), "tester:wrong".to_string())].into(),
    };
    let e = lookup(&wrong, &image).expect_err("wrong password");
    assert!(
        matches!(e, RegistryError::Unauthorized { status: 401, .. }),
        "{e}"
    );

    // A tag that is not there: the registry's own words.
    let e = lookup(&with, &format!("{}/team/http:nope", reg.addr))
        .expect_err("missing tag")
        .to_string();
    assert!(e.contains("404") && e.contains("manifest unknown"), "{e}");

    // Nothing listening.
    let e = lookup(&none, &format!("127.0.0.1:{}/x:y", free_port()))
        .expect_err("closed port")
        .to_string();
    assert!(
        e.contains("Connection refused") || e.contains("connection refused"),
        "{e}"
    );

    // The Bearer flow, through a token gate in front of the registry.
    let gate = gate::start(reg.addr);
    let through = Registries {
        insecure: vec![],
        auths: [(gate.to_string(), "tester:s3cret".to_string())].into(),
    };
    let image = format!("{gate}/team/http:v1");
    let config = lookup(&through, &image).expect("through a token");
    assert_eq!(config.entrypoint, ["/server", "--port"]);
    let denied = Registries {
        insecure: vec![],
        auths: [(gate.to_string(), "tester:wrong".to_string())].into(),
    };
    let e = lookup(&denied, &image).expect_err("no token for a wrong password");
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");
}

fn push_with_password(reg: &Registry) -> (String, String) {
    // `docker login --password-stdin` reads the password from stdin.
    let cfg = reg.dir.join("docker");
    std::fs::create_dir_all(&cfg).expect("docker config dir");
    let mut login = Command::new("docker")
        .env("DOCKER_CONFIG", &cfg)
        .args([
            "login",
            &reg.addr.to_string(),
            "-u",
            "tester",
            "--password-stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker login");
    if let Some(mut stdin) = login.stdin.take() {
        use std::io::Write;
        stdin.write_all(b"s3cret\n").expect("password");
    }
    let out = login.wait_with_output().expect("docker login");
    assert!(out.status.success(), "docker login: {out:?}");
    push(reg)
}

/// A Bearer token gate: what Docker Hub's auth service and registry do
/// between them, in front of a registry that itself wants Basic.
mod gate {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, StatusCode, header};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    const TOKEN: &str = "tok-7f3a";

    pub fn start(upstream: SocketAddr) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("gate");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let svc =
                            hyper::service::service_fn(move |req| answer(req, addr, upstream));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            });
        });
        addr
    }

    async fn answer(
        req: Request<hyper::body::Incoming>,
        me: SocketAddr,
        upstream: SocketAddr,
    ) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let reply = |status: StatusCode, body: &str| {
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap_or_default()
        };
        if req.uri().path() == "/token" {
            let query = req.uri().query().unwrap_or_default();
            // tester:s3cret
            let good = auth == "Basic dGVzdGVyOnMzY3JldA==";
            if good && query.contains("scope=repository%3Ateam%2Fhttp%3Apull") {
                return Ok(reply(StatusCode::OK, &format!(r#"{{"token": "{TOKEN}"}}"#)));
            }
            return Ok(reply(StatusCode::UNAUTHORIZED, r#"{"errors": []}"#));
        }
        if auth != format!("Bearer {TOKEN}") {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                r#"{"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}"#,
            );
            let challenge = format!(
                r#"Bearer realm="http://{me}/token",service="gate.test",scope="repository:team/http:pull""#
            );
            if let Ok(v) = header::HeaderValue::from_str(&challenge) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return Ok(r);
        }
        // Forwarded with the registry's own credentials.
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut fwd = Request::get(format!(
            "http://{upstream}{}",
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        ))
        .header(header::AUTHORIZATION, "Basic dGVzdGVyOnMzY3JldA==");
        if let Some(a) = req.headers().get(header::ACCEPT) {
            fwd = fwd.header(header::ACCEPT, a);
        }
        let Ok(fwd) = fwd.body(Full::new(Bytes::new())) else {
            return Ok(reply(StatusCode::BAD_GATEWAY, "{}"));
        };
        let Ok(resp) = client.request(fwd).await else {
            return Ok(reply(StatusCode::BAD_GATEWAY, "{}"));
        };
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok(Response::from_parts(parts, Full::new(body)))
    }
}
