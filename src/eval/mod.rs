//! Evaluation: perplexity / bits per character on text sets ([`ppl`]) and multiple-choice
//! benchmarks: records ([`questions`]) read from their published layouts ([`load`]), prompted in
//! ColossalEval's or the benchmarks' own style ([`prompt`]), scored by first-token logits ([`mc`]).
pub mod load;
pub mod mc;
pub mod ppl;
pub mod prompt;
pub mod pyliteral;
pub mod questions;
