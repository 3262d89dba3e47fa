//! The layout rules of ARCHITECTURE.md, checked on the source itself: the library has at most
//! twelve top-level modules, each imports only modules declared before it in src/lib.rs (so
//! data flows one way and there is no cycle), and the engine imports nothing outside itself.
//! Test code is exempt: unit tests may reach for helpers anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules in declaration order (`mod` lines of src/lib.rs, test-only ones
/// left out).
fn top_level_modules() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut out = Vec::new();
    let mut test_only = false;
    for line in lib.lines().map(str::trim) {
        if line == "#[cfg(test)]" {
            test_only = true;
            continue;
        }
        let decl = line.strip_prefix("pub ").unwrap_or(line);
        let decl = decl.strip_prefix("pub(crate) ").unwrap_or(decl);
        if let Some(name) = decl.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
            if !test_only {
                out.push(name.to_string());
            }
        }
        test_only = false;
    }
    out
}

/// The source files of module `name`: `src/name.rs`, or everything under `src/name/`.
fn files_of(name: &str) -> Vec<PathBuf> {
    let file = src().join(format!("{name}.rs"));
    if file.exists() {
        return vec![file];
    }
    let mut out = Vec::new();
    let mut stack = vec![src().join(name)];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `text` without comments, string and char literals (their contents blanked), so braces
/// and paths are only those of the code.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'r' if b.get(i + 1) == Some(&b'"') || (b.get(i + 1) == Some(&b'#') && b.get(i + 2).is_some_and(|c| *c == b'"' || *c == b'#')) => {
                // Raw string r"..." / r#"..."#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b[j] == b'#' {
                    hashes += 1;
                    j += 1;
                }
                j += 1;
                let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
                while j < b.len() && !b[j..].starts_with(&close) {
                    j += 1;
                }
                out.push_str("\"\"");
                i = j + close.len();
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                out.push_str("\"\"");
                i += 1;
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') || (b.get(i + 1) == Some(&b'\\') && b[i + 2..].iter().take(10).any(|c| *c == b'\'')) => {
                // A char literal ('x', '\n', '\u{..}'), not a lifetime.
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                out.push_str("' '");
                i += 1;
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

/// The code of `path` outside `#[cfg(test)]` items, and the files of test-only modules it
/// declares (`#[cfg(test)] mod x;`).
fn non_test_code(path: &Path) -> (String, Vec<PathBuf>) {
    let code = code_only(&std::fs::read_to_string(path).unwrap());
    let mut out = String::new();
    let mut test_files = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = rest[at + "#[cfg(test)]".len()..].trim_start();
        let end_of_item = match (after.find(';'), after.find('{')) {
            (Some(semi), brace) if brace.is_none_or(|b| semi < b) => {
                if let Some(name) = after[..semi].trim().strip_prefix("mod ").or_else(|| after[..semi].trim().strip_prefix("pub(crate) mod ")) {
                    let dir = if path.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs") {
                        path.parent().unwrap().to_path_buf()
                    } else {
                        path.with_extension("")
                    };
                    let name = name.trim();
                    test_files.push(dir.join(format!("{name}.rs")));
                    test_files.push(dir.join(name).join("mod.rs"));
                }
                semi + 1
            }
            (_, Some(brace)) => {
                let mut depth = 0;
                let mut end = after.len();
                for (i, c) in after[brace..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = brace + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            _ => after.len(),
        };
        rest = &after[end_of_item..];
    }
    out.push_str(rest);
    (out, test_files)
}

/// Which top-level modules each top-level module's non-test code names as `crate::X`.
fn imports(modules: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for m in modules {
        let parsed: Vec<(PathBuf, String, Vec<PathBuf>)> = files_of(m)
            .into_iter()
            .map(|f| {
                let (code, test_files) = non_test_code(&f);
                (f, code, test_files)
            })
            .collect();
        let test_files: BTreeSet<&PathBuf> = parsed.iter().flat_map(|p| &p.2).collect();
        let code: String = parsed.iter().filter(|p| !test_files.contains(&p.0)).map(|p| p.1.as_str()).collect();
        let mut uses = BTreeSet::new();
        for other in modules.iter().filter(|o| *o != m) {
            let direct = format!("crate::{other}::");
            let grouped = |c: &str| {
                c.match_indices("crate::{").any(|(i, _)| {
                    let inner = &c[i + 8..c[i..].find('}').map_or(c.len(), |e| i + e)];
                    inner.split(',').any(|part| part.trim().split("::").next() == Some(other.as_str()))
                })
            };
            if code.contains(&direct) || code.contains(&format!("crate::{other};")) || grouped(&code) {
                uses.insert(other.clone());
            }
        }
        graph.insert(m.clone(), uses);
    }
    graph
}

#[test]
fn twelve_top_level_modules_at_most() {
    let modules = top_level_modules();
    assert!(!modules.is_empty());
    assert!(modules.len() <= 12, "src/lib.rs declares {} top-level modules: {modules:?}", modules.len());
}

#[test]
fn modules_import_only_those_declared_before_them() {
    let modules = top_level_modules();
    let graph = imports(&modules);
    let mut wrong = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        for used in &graph[m] {
            let j = modules.iter().position(|x| x == used).unwrap();
            if j > i {
                wrong.push(format!("{m} imports {used}, which src/lib.rs declares after it"));
            }
        }
    }
    assert!(wrong.is_empty(), "data must flow one way (ARCHITECTURE.md):\n{}", wrong.join("\n"));
}

#[test]
fn the_engine_imports_nothing_outside_itself() {
    let modules = top_level_modules();
    let graph = imports(&modules);
    assert!(graph["engine"].is_empty(), "the engine imports {:?}; it must be self-contained", graph["engine"]);
}

#[test]
fn the_checker_sees_imports_and_skips_tests_and_comments() {
    let code = "use crate::records::Item; // crate::hub in a comment\nlet s = \"crate::data\";\n#[cfg(test)]\nmod tests {\n    use crate::store::RunDir;\n    fn f() { let x = '{'; }\n}\nfn g() { crate::prompt::x(); }\n";
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.rs");
    std::fs::write(&f, code).unwrap();
    let (c, tests) = non_test_code(&f);
    assert!(c.contains("crate::records::Item") && c.contains("crate::prompt::x"), "{c}");
    assert!(!c.contains("crate::hub") && !c.contains("crate::data") && !c.contains("crate::store"), "{c}");
    assert!(tests.is_empty());
    std::fs::write(&f, "#[cfg(test)]\nmod parity_tests;\nuse crate::{hub, records::Item};\n").unwrap();
    let (c, tests) = non_test_code(&f);
    assert_eq!(tests, [dir.path().join("m").join("parity_tests.rs"), dir.path().join("m").join("parity_tests").join("mod.rs")]);
    assert!(c.contains("crate::{hub, records::Item}"), "{c}");
}
