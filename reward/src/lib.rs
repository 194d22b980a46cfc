//! `reward`: the Bradley-Terry reward model stage.
//!
//! Not built yet: a Gemma backbone with a `score` head
//! (`GemmaForSequenceClassification`), trained on preference pairs with
//! −log σ(r_chosen − r_rejected − margin).
