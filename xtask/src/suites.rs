//! Which packages make up each test suite.

use crate::params::Suite;

/// The workspace packages whose tests form `suite`.
pub fn packages(suite: Suite) -> &'static [&'static str] {
    match suite {
        Suite::Core => &["llama-core", "llama-fixtures", "xtask"],
        Suite::Rope => &["llama-rope"],
        Suite::Attention => &["llama-attn"],
        Suite::Optimization => &["llama-ops"],
        Suite::FastModel => &["llama-model", "llama-peft", "llama-patch", "llama-cli"],
        Suite::Integration => &["fastllama-integration", "llama-experiments"],
    }
}

/// Parses suite names; an unknown one is an error listing the valid names.
pub fn parse(names: &[String]) -> Result<Vec<Suite>, String> {
    if names.is_empty() {
        return Ok(Suite::ALL.to_vec());
    }
    let mut suites = Vec::new();
    for name in names
        .iter()
        .flat_map(|n| n.split(','))
        .filter(|n| !n.is_empty())
    {
        let suite = Suite::from_name(name)
            .ok_or_else(|| format!("unknown suite {name:?}; valid suites: {}", valid_names()))?;
        if !suites.contains(&suite) {
            suites.push(suite);
        }
    }
    Ok(suites)
}

fn valid_names() -> String {
    Suite::ALL.map(Suite::name).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_list_the_valid() {
        let got = parse(&["rope".into(), "fast-model,rope".into()]).unwrap();
        assert_eq!(got, vec![Suite::Rope, Suite::FastModel]);
        assert_eq!(parse(&[]).unwrap().len(), Suite::ALL.len());
        let err = parse(&["ropes".into()]).unwrap_err();
        assert!(
            err.contains("\"ropes\"") && err.contains("core, rope, attention"),
            "{err}"
        );
    }

    #[test]
    fn every_suite_has_packages() {
        for suite in Suite::ALL {
            assert!(!packages(suite).is_empty(), "{}", suite.name());
        }
    }
}
