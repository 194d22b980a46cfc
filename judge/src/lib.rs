//! `judge`: the side-by-side harness.
//!
//! Not built yet: candidate and baseline answer the same prompts, a judge
//! compares both orders, win rates with bootstrap intervals per category.
