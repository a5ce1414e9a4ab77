//! Evaluation: perplexity / bits per character on text sets ([`ppl`]) and multiple-choice
//! benchmarks scored by first-token logits ([`mc`]).
pub mod mc;
pub mod ppl;
