//! Bad input: every file of the corpus in `tests/bad` and a set of generated pathological
//! inputs must give a diagnostic naming file:line:col with a caret under the span, and must
//! not panic or overflow the stack. The rendered diagnostics are snapshot-tested.

use normforge::dsl;
use std::path::Path;

/// Compile bytes the way `normforge check` does and render the errors.
fn diagnose(name: &str, bytes: &[u8]) -> String {
    let (src, diags) = match dsl::source_from_bytes(bytes) {
        Ok(src) => {
            let d = dsl::compile(&src).expect_err(&format!("{name} should not compile"));
            (src, d)
        }
        Err((lossy, d)) => (lossy, d),
    };
    dsl::diag::render(&diags, name, &src)
}

/// The header names `name:line:col`, and some line holds a caret.
fn assert_located(name: &str, rendered: &str) {
    let header = rendered.lines().nth(1).unwrap_or_default();
    let tag = format!("--> {name}:");
    let pos = header.find(&tag).unwrap_or_else(|| panic!("no file:line:col in {rendered}"));
    let rest = &header[pos + tag.len()..];
    let mut parts = rest.splitn(3, ':');
    let line: usize = parts.next().unwrap().parse().unwrap_or_else(|_| panic!("no line in {header}"));
    let col: usize = parts.next().unwrap().parse().unwrap_or_else(|_| panic!("no column in {header}"));
    assert!(line >= 1 && col >= 1, "{header}");
    assert!(rendered.lines().any(|l| l.contains('^')), "no caret in:\n{rendered}");
}

#[test]
fn corpus_of_bad_inputs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 40, "the corpus has only {} files", files.len());
    for path in files {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let rendered = diagnose(&name, &std::fs::read(&path).unwrap());
        assert_located(&name, &rendered);
        insta::assert_snapshot!(format!("bad__{}", name.trim_end_matches(".nf")), rendered);
    }
}

/// Inputs too large to keep as files, broken into short lines so the excerpts stay small.
fn generated() -> Vec<(&'static str, String)> {
    let lines = |unit: &str, n: usize, per_line: usize| -> String {
        (0..n).map(|i| if i % per_line == per_line - 1 { format!("{unit}\n") } else { unit.to_string() }).collect()
    };
    let wrap = |e: String| format!("layer a(x[d]) {{\n    return {e}\n}}\n");
    vec![
        ("deep_parens", wrap(format!("{}x{}", lines("(", 100_000, 50), ")".repeat(100_000)))),
        ("deep_brackets", format!("layer a(x{}d{}) {{ return x }}", lines("[", 100_000, 50), "]".repeat(100_000))),
        ("deep_braces", format!("layer a(x[d]) {}\n", lines("{", 100_000, 50))),
        ("deep_calls", wrap(format!("{}x{}", lines("exp(", 100_000, 20), ")".repeat(100_000)))),
        ("deep_prefix_minus", wrap(format!("{}x", lines("- ", 100_000, 40)))),
        ("deep_prefix_not", wrap(format!("select({}x > 0, x, x)", lines("!", 100_000, 60)))),
        ("long_sum_chain", wrap(format!("x{}", lines(" + x", 100_000, 20)))),
        ("long_product_chain", wrap(format!("x{}", lines(" * 2", 100_000, 20)))),
        ("deep_power_exponent", wrap(format!("x^{}2", lines("-", 100_000, 60)))),
    ]
}

#[test]
fn pathological_nesting_is_an_error_not_a_crash() {
    for (name, src) in generated() {
        let rendered = diagnose(name, src.as_bytes());
        assert_located(name, &rendered);
        assert!(rendered.contains("deep") || rendered.contains("nested"), "{name}: {rendered}");
        insta::assert_snapshot!(format!("generated__{name}"), rendered);
    }
}

#[test]
fn long_else_if_chain_does_not_overflow() {
    // Flat in the grammar and lowered iteratively: 100k branches compile or fail cleanly.
    let mut src = String::from("layer a(x[d]) {\n    if x > 0 {\n        return x\n    }");
    for i in 0..100_000 {
        src.push_str(&format!(" else if x > {i} {{\n        return x\n    }}"));
    }
    src.push_str(" else {\n        return -x\n    }\n}\n");
    let result = std::thread::Builder::new()
        .stack_size(2 << 20) // the default test-thread stack: no headroom is borrowed
        .spawn(move || dsl::compile(&src).map(|e| e.len()))
        .unwrap()
        .join()
        .expect("compiling a long else-if chain panicked");
    assert_eq!(result.unwrap(), 1);
}

#[test]
fn random_binary_is_an_error_not_a_crash() {
    // Deterministic pseudo-random bytes (xorshift), some valid UTF-8, some not.
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    for len in [1usize, 7, 64, 1000, 20_000] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect();
        let rendered = diagnose("random.nf", &bytes);
        assert_located("random.nf", &rendered);
    }
}
