//! The tools for people: questions asked of the engine, never of the kernel.
//!
//! - [`explain`]: one connection's verdict and why, per side;
//! - [`matrix`]: the truth table between pods, every cell an `explain` verdict;
//! - [`lint`]: mistakes in loaded manifests, each naming the object, field and rule;
//! - [`rule_hits`]: the agent's rule hit counts, and the rules that never matched.
//!
//! They run in the CLI and, for `explain`, behind the agent's `/debug/explain`.

pub mod explain;
pub mod lint;
pub mod matrix;
pub mod rule_hits;
