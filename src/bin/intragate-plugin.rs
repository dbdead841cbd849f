//! `intragate-plugin`: the client plug-in. Not implemented yet (see the
//! client plug-in issue); until then use the stock openconnect client.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "intragate-plugin is not implemented yet.\n\
         Connect with the stock client instead:\n  \
         openconnect --protocol=anyconnect --servercert pin-sha256:... https://GATEWAY/\n\
         ('intragate fingerprint' on the gateway prints the pin)."
    );
    ExitCode::from(2)
}
