//! Asking the user on the controlling terminal: visible answers, and secret
//! answers with echo turned off (restored even if reading fails).
//!
//! Questions and messages go to `/dev/tty` when it can be opened, so that
//! stdout stays free for the status lines; answers are read from it too.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::fd::AsRawFd;

use super::forms::Prompter;
use super::Secret;

/// Longest answer read (a longer line is cut).
const MAX_ANSWER: usize = 4096;

/// The terminal prompter. Interactive only when a terminal is available and
/// `--non-inter` was not given.
#[derive(Debug)]
pub struct TerminalPrompter {
    tty: Option<File>,
}

impl TerminalPrompter {
    /// Opens `/dev/tty` unless `non_interactive`, or when stdin is not a
    /// terminal (a script piping the password must never block on a prompt).
    pub fn new(non_interactive: bool) -> Self {
        let tty = if non_interactive || !std::io::stdin().is_terminal() {
            None
        } else {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/tty")
                .ok()
        };
        Self { tty }
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        let tty = self.tty.as_ref().ok_or(std::io::ErrorKind::Unsupported)?;
        let mut line = String::new();
        let n = BufReader::new(tty.take(MAX_ANSWER as u64)).read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "end of input",
            ));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    fn write(&mut self, text: &str) {
        if let Some(tty) = self.tty.as_mut() {
            let _ = tty.write_all(text.as_bytes());
            let _ = tty.flush();
        }
    }
}

impl Prompter for TerminalPrompter {
    fn interactive(&self) -> bool {
        self.tty.is_some()
    }

    fn show(&mut self, text: &str) {
        self.write(&format!("{text}\n"));
    }

    fn ask_text(&mut self, label: &str) -> std::io::Result<String> {
        self.write(&format!("{label} "));
        self.read_line()
    }

    fn ask_secret(&mut self, label: &str) -> std::io::Result<Secret> {
        self.write(&format!("{label} "));
        let fd = self
            .tty
            .as_ref()
            .ok_or(std::io::ErrorKind::Unsupported)?
            .as_raw_fd();
        let guard = EchoOff::new(fd);
        let answer = self.read_line();
        drop(guard);
        self.write("\n");
        answer.map(Secret::new)
    }
}

/// Turns terminal echo off for its lifetime.
struct EchoOff {
    fd: i32,
    saved: Option<libc::termios>,
}

impl EchoOff {
    fn new(fd: i32) -> Self {
        // SAFETY: termios is plain old data; tcgetattr fills it or fails, and
        // on failure we never use it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is an open terminal descriptor owned by the caller; `t`
        // is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Self { fd, saved: None };
        }
        let saved = t;
        t.c_lflag &= !(libc::ECHO | libc::ECHONL);
        t.c_lflag |= libc::ICANON;
        // SAFETY: as above; `t` is a valid termios derived from the current one.
        unsafe {
            libc::tcsetattr(fd, libc::TCSAFLUSH, &t);
        }
        Self {
            fd,
            saved: Some(saved),
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            // SAFETY: restores the attributes read from the same descriptor.
            unsafe {
                libc::tcsetattr(self.fd, libc::TCSAFLUSH, &saved);
            }
        }
    }
}

/// Reads the first line of stdin (`--password-stdin`), without the line end.
///
/// # Errors
/// I/O errors, or an empty stdin.
pub fn read_stdin_line() -> std::io::Result<Secret> {
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .take(MAX_ANSWER as u64)
        .read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "stdin is empty (expected the password on its first line)",
        ));
    }
    Ok(Secret::new(line.trim_end_matches(['\r', '\n'])))
}
