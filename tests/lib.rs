//! Workspace integration tests of fastllama (suite `integration`): flows that cross crates —
//! attention with a decoder layer, the full model, PEFT, patching — and the architecture rules
//! that keep the crates layered. The tests are the `[[test]]` targets beside this file.
