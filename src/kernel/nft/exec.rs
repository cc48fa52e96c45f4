//! Send one transaction to the kernel with `nft -f -`.
//!
//! nft turns the whole script into one netlink batch, which the kernel commits all or
//! nothing: a rejected transaction leaves the previous ruleset exactly as it was. When it is
//! rejected, the error quotes nft's message together with the script lines it points at.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a transaction was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// nft could not be started.
    #[error("cannot run {nft}: {source}")]
    Spawn {
        /// Path of the nft binary.
        nft: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel or nft rejected the transaction; nothing was changed.
    #[error("nft rejected the transaction (nothing was changed): {message}")]
    Rejected {
        /// nft's stderr, with the offending script lines quoted.
        message: String,
    },
}

/// How to run nft.
#[derive(Clone, Debug)]
pub struct Nft {
    /// Binary to run.
    pub path: PathBuf,
}

impl Default for Nft {
    fn default() -> Self {
        Self {
            path: PathBuf::from("nft"),
        }
    }
}

impl Nft {
    /// Use a specific nft binary.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
        }
    }

    /// Apply a script atomically.
    pub fn apply(&self, script: &str) -> Result<(), ExecError> {
        self.run(&["-f", "-"], script)
    }

    /// Check a script without applying it (`nft -c`).
    pub fn check(&self, script: &str) -> Result<(), ExecError> {
        self.run(&["-c", "-f", "-"], script)
    }

    /// Run nft with arguments and return its stdout (e.g. `list table`).
    pub fn output(&self, args: &[&str]) -> Result<String, ExecError> {
        let out = Command::new(&self.path)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ExecError::Spawn {
                nft: self.path.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(ExecError::Rejected {
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run(&self, args: &[&str], script: &str) -> Result<(), ExecError> {
        let mut child = Command::new(&self.path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ExecError::Spawn {
                nft: self.path.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error means nft exited early; its status and stderr tell why.
            let _ = stdin.write_all(script.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| ExecError::Spawn {
                nft: self.path.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(ExecError::Rejected {
            message: explain(&stderr, script),
        })
    }
}

/// nft reports `/dev/stdin:LINE:COL-COL: Error: …`; quote the script lines it names.
fn explain(stderr: &str, script: &str) -> String {
    let lines: Vec<&str> = script.lines().collect();
    let mut msg = String::new();
    for l in stderr.lines() {
        if let Some(rest) = l.strip_prefix("/dev/stdin:") {
            let n: Option<usize> = rest.split(':').next().and_then(|s| s.parse().ok());
            let err = rest.split_once("Error:").map_or(rest, |(_, e)| e).trim();
            if !msg.is_empty() {
                msg.push_str("; ");
            }
            match n.and_then(|n| lines.get(n.wrapping_sub(1))) {
                Some(text) => {
                    msg.push_str(&format!("{err} (script line {}: {text})", n.unwrap_or(0)))
                }
                None => msg.push_str(err),
            }
        }
    }
    if msg.is_empty() {
        stderr.trim().to_string()
    } else {
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_lines_are_quoted() {
        let script = "add table inet t\nadd rule inet t missing accept\n";
        let stderr = "/dev/stdin:2:18-24: Error: No such file or directory; did you mean chain 'x' in table inet 't'?\nadd rule inet t missing accept\n                 ^^^^^^^\n";
        let m = explain(stderr, script);
        assert!(m.contains("No such file or directory"), "{m}");
        assert!(
            m.contains("script line 2: add rule inet t missing accept"),
            "{m}"
        );
    }
}
