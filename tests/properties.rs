//! Property tests: random and mutated specs never panic the front end, and whatever
//! compiles formats idempotently without changing its meaning.

use normforge::dsl;
use proptest::prelude::*;

const TOKENS: &[&str] = &[
    "layer", "reparam", "optimizer", "param", "buffer", "state", "let", "return", "if", "else", "over", "true", "false",
    "in", "x", "p", "g", "t", "d", "n", "c", "s", "w", "eps", "lr", "train", "mean", "var", "sum", "max", "sqrt",
    "rsqrt", "select", "lerp", "size", "rank", "(", ")", "[", "]", "{", "}", ",", ";", ":", "=", "==", "!=", "<", ">",
    "+", "-", "*", "/", "^", "!", "&&", "||", "...", "@paper", "\"doc\"", "0", "1", "2.5", "1e-5", "-3", "\n", " ",
    "# note\n", "float", "int", "bool", "\u{e9}", "\0",
];

/// Compile and format `src`; where it compiles, formatting must be idempotent and keep the
/// IR. Returns whether it compiled.
fn exercise(src: &str) -> bool {
    let compiled = dsl::compile(src);
    let formatted = dsl::fmt::format(src);
    if let (Ok(entries), Ok(f)) = (compiled, formatted) {
        let again = dsl::fmt::format(&f).expect("formatted text parses");
        assert_eq!(f, again, "formatting is not idempotent for:\n{src}");
        assert_eq!(dsl::compile(&f).expect("formatted text checks"), entries, "formatting changed the meaning of:\n{src}");
        return true;
    }
    false
}

/// The mutation property only means something if a fair share of mutants still compile.
#[test]
fn many_single_mutations_still_compile() {
    let sources = std_sources();
    let mut compiled = 0;
    let total = 300;
    let mut seed: u64 = 12345;
    for i in 0..total {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let e = match i % 4 {
            0 => Edit::Delete((seed >> 20) as usize, 1),
            1 => Edit::Insert((seed >> 20) as usize, (seed >> 8) as usize),
            2 => Edit::Duplicate((seed >> 20) as usize, (seed >> 8) as usize),
            _ => Edit::Swap((seed >> 20) as usize, (seed >> 40) as usize),
        };
        if exercise(&apply(&sources[i % sources.len()], &[e])) {
            compiled += 1;
        }
    }
    assert!(compiled * 10 > total, "only {compiled} of {total} mutants compiled");
}

fn std_sources() -> Vec<String> {
    normforge::std_sources().into_iter().map(|(_, t)| t.to_string()).collect()
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, usize),
    Duplicate(usize, usize),
    Swap(usize, usize),
}

fn apply(src: &str, edits: &[Edit]) -> String {
    let mut s: Vec<char> = src.chars().collect();
    for e in edits {
        let n = s.len().max(1);
        match *e {
            Edit::Delete(a, len) => {
                let a = a % n;
                let b = (a + len % 12).min(s.len());
                s.drain(a.min(s.len())..b);
            }
            Edit::Insert(a, tok) => {
                let a = (a % n).min(s.len());
                for (k, c) in TOKENS[tok % TOKENS.len()].chars().enumerate() {
                    s.insert(a + k, c);
                }
            }
            Edit::Duplicate(a, len) => {
                let a = (a % n).min(s.len());
                let b = (a + len % 40).min(s.len());
                let piece: Vec<char> = s[a..b].to_vec();
                for (k, c) in piece.into_iter().enumerate() {
                    s.insert(b + k, c);
                }
            }
            Edit::Swap(a, b) => {
                if !s.is_empty() {
                    let (a, b) = (a % s.len(), b % s.len());
                    s.swap(a, b);
                }
            }
        }
    }
    s.into_iter().collect()
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::Delete(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::Insert(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::Duplicate(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::Swap(a, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn token_soup_never_panics(toks in prop::collection::vec(0..TOKENS.len(), 0..120)) {
        let src: String = toks.iter().map(|&i| TOKENS[i]).collect::<Vec<_>>().join(" ");
        let _ = exercise(&src);
    }

    #[test]
    fn mutated_std_specs_never_panic(file in 0usize..13, edits in prop::collection::vec(edit(), 1..6)) {
        let sources = std_sources();
        let src = apply(&sources[file % sources.len()], &edits);
        let _ = exercise(&src);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        match dsl::source_from_bytes(&bytes) {
            Ok(src) => { let _ = exercise(&src); }
            Err((lossy, d)) => { dsl::diag::render(&d, "bytes.nf", &lossy); }
        }
    }

    #[test]
    fn arbitrary_text_never_panics(src in "\\PC{0,300}") {
        let _ = exercise(&src);
    }
}
