//! Evaluation: perplexity / bits per character on text sets ([`ppl`]) and multiple-choice
//! benchmarks scored by first-token logits ([`mc`]), with ColossalEval's prompts ([`colossal`]).
pub mod colossal;
pub mod mc;
pub mod ppl;
