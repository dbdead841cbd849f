//! A real FreeRADIUS (`freeradius -X -f -d DIR`) for the RADIUS tests and
//! bench, with a configuration written from scratch into the test's temp dir
//! (nothing from /etc/freeradius, no default service):
//!
//! - one client (the gateway's address) with the given secret and
//!   `require_message_authenticator = yes`;
//! - every reply carries a Message-Authenticator (`update reply {
//!   &Message-Authenticator := 0x00 }`: FreeRADIUS 3.2.1 does not add one
//!   by itself; 3.2.5+ does);
//! - users (the `files` module): `alice` / `alice-pw` with `Class =
//!   "OU=staff"` and `Filter-Id = "staff"`; `carol` / `carol-pw` with
//!   `Framed-IP-Address` (given) and `Class = "admins"`;
//! - `bob`: an Access-Challenge exchange in unlang: `bob-pw` without State
//!   gets "Enter the code sent to your phone" and a State; the State and
//!   the code `246810` get an Access-Accept (Class "OU=staff");
//! - accounting to a `detail` file ([`FreeRadius::detail`]).
//!
//! Self-contained (std only) so the bench can include it with `#[path]`.
#![allow(dead_code)]
#![allow(unreachable_pub)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The challenge user's second-factor code.
pub const BOB_CODE: &str = "246810";
/// The challenge's prompt.
pub const BOB_PROMPT: &str = "Enter the code sent to your phone";

/// Where and for whom FreeRADIUS listens.
pub struct RadiusOpts<'a> {
    /// Network namespace to run in (None: this one).
    pub ns: Option<&'a str>,
    /// Listen address.
    pub listen: &'a str,
    /// Authentication port (accounting: `auth_port + 1`).
    pub auth_port: u16,
    /// The gateway's (client's) source address.
    pub client: &'a str,
    /// The shared secret.
    pub secret: &'a str,
    /// carol's Framed-IP-Address.
    pub carol_addr: &'a str,
}

/// A running FreeRADIUS, killed on drop.
pub struct FreeRadius {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
}

fn config(dir: &Path, o: &RadiusOpts<'_>) -> String {
    let d = dir.display();
    let acct_port = o.auth_port + 1;
    format!(
        r#"prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
confdir = {d}
raddbdir = {d}
modconfdir = {d}
logdir = {d}/log
radacctdir = {d}/acct
run_dir = {d}/run
db_dir = {d}
libdir = /usr/lib/freeradius
pidfile = {d}/run/radiusd.pid
name = freeradius
max_request_time = 30
cleanup_delay = 2
max_requests = 65536
hostname_lookups = no
log {{
  destination = stdout
  colourise = no
  auth = yes
}}
security {{
  allow_core_dumps = no
  max_attributes = 200
  reject_delay = 0
  status_server = yes
}}
thread pool {{
  start_servers = 8
  max_servers = 32
  min_spare_servers = 4
  max_spare_servers = 16
  max_requests_per_server = 0
}}
client gateway {{
  ipaddr = {client}
  secret = {secret}
  require_message_authenticator = yes
  nas_type = other
}}
modules {{
  pap {{
    normalise = yes
  }}
  files {{
    filename = {d}/users
  }}
  detail {{
    filename = {d}/acct/detail
    escape_filenames = no
    permissions = 0600
    header = "%t"
  }}
  always ok {{
    rcode = ok
  }}
  always handled {{
    rcode = handled
  }}
  always reject {{
    rcode = reject
  }}
}}
server default {{
  listen {{
    type = auth
    ipaddr = {listen}
    port = {auth_port}
  }}
  listen {{
    type = acct
    ipaddr = {listen}
    port = {acct_port}
  }}
  authorize {{
    update reply {{
      &Message-Authenticator := 0x00
    }}
    if (&User-Name == "bob") {{
      if (!&State) {{
        if (&User-Password == "bob-pw") {{
          update reply {{
            &Reply-Message := "{prompt}"
            &State := 0x6f74702d7374617465
          }}
          update control {{
            &Response-Packet-Type := Access-Challenge
          }}
          handled
        }}
        reject
      }}
      if (&State == 0x6f74702d7374617465 && &User-Password == "{code}") {{
        update reply {{
          &Class := "OU=staff"
        }}
        update control {{
          &Auth-Type := Accept
        }}
        ok
      }}
      else {{
        reject
      }}
    }}
    else {{
      files
      pap
    }}
  }}
  authenticate {{
    Auth-Type PAP {{
      pap
    }}
  }}
  preacct {{
  }}
  accounting {{
    detail
    ok
  }}
  post-auth {{
    Post-Auth-Type REJECT {{
      update reply {{
        &Message-Authenticator := 0x00
      }}
      ok
    }}
  }}
}}
"#,
        client = o.client,
        secret = o.secret,
        listen = o.listen,
        auth_port = o.auth_port,
        prompt = BOB_PROMPT,
        code = BOB_CODE,
    )
}

impl FreeRadius {
    /// Write the configuration into `dir` and start FreeRADIUS; waits
    /// (bounded) until it says it is ready.
    pub fn start(dir: &Path, o: &RadiusOpts<'_>) -> FreeRadius {
        for sub in ["run", "log", "acct"] {
            fs::create_dir_all(dir.join(sub)).expect("radius dirs");
        }
        fs::write(dir.join("radiusd.conf"), config(dir, o)).expect("radiusd.conf");
        fs::write(
            dir.join("users"),
            format!(
                "alice Cleartext-Password := \"alice-pw\"\n      Class = \"OU=staff\", Filter-Id = \"staff\"\n\
                 carol Cleartext-Password := \"carol-pw\"\n      Framed-IP-Address = {}, Class = \"admins\"\n",
                o.carol_addr
            ),
        )
        .expect("users");
        let log = dir.join("freeradius.log");
        let out = fs::File::create(&log).expect("radius log");
        let err = out.try_clone().expect("radius log");
        let d = dir.to_string_lossy().into_owned();
        let mut cmd = match o.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "freeradius", "-X", "-f", "-d", &d]);
                c
            }
            None => {
                let mut c = Command::new("freeradius");
                c.args(["-X", "-f", "-d", &d]);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start freeradius");
        let mut r = FreeRadius {
            child: Some(child),
            dir: dir.to_path_buf(),
            log,
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if r.log_text().contains("Ready to process requests") {
                return r;
            }
            if let Some(c) = r.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("freeradius exited ({st}):\n{}", r.log_text());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("freeradius not ready in 20 s:\n{}", r.log_text());
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The accounting detail file's records, each as attribute → value
    /// (quotes stripped).
    pub fn detail(&self) -> Vec<Vec<(String, String)>> {
        let text = fs::read_to_string(self.dir.join("acct/detail")).unwrap_or_default();
        text.split("\n\n")
            .map(|rec| {
                rec.lines()
                    .filter_map(|l| {
                        let (k, v) = l.trim().split_once(" = ")?;
                        Some((k.to_string(), v.trim_matches('"').to_string()))
                    })
                    .collect::<Vec<_>>()
            })
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// Stop it (SIGKILL; it keeps no state the tests need).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for FreeRadius {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of `key` in a detail record.
pub fn field<'a>(rec: &'a [(String, String)], key: &str) -> Option<&'a str> {
    rec.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}
