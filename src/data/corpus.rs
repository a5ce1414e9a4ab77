//! Reading corpora: JSONL (`{"text"}` or Colossal's `{"source","target","category"}`) and plain
//! text, one document per file or per blank-line-separated block.
//!
//! Bad input never panics. Anything that can be skipped without losing data silently is skipped
//! and recorded as an [`Issue`] naming the file and line; I/O errors are hard errors.
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One training document. `source` is a prompt whose tokens carry no loss (empty for plain
/// pre-training text); `target` is the text that is learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub source: String,
    pub target: String,
    /// Where it came from (for error messages).
    pub file: std::sync::Arc<PathBuf>,
    pub line: usize,
}

impl Document {
    pub fn text_len(&self) -> usize {
        self.source.len() + self.target.len()
    }
}

/// How `.txt` files are cut into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum TxtSplit {
    /// The whole file is one document.
    File,
    /// Blocks separated by one or more blank (whitespace-only) lines.
    BlankLine,
}

#[derive(Clone, Debug)]
pub struct CorpusOptions {
    pub txt_split: TxtSplit,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions { txt_split: TxtSplit::BlankLine }
    }
}

/// Something skipped, with its location.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Issue {
    pub file: PathBuf,
    /// 1-based line; `None` for whole-file issues.
    pub line: Option<usize>,
    pub kind: IssueKind,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IssueKind {
    InvalidJson,
    MissingField,
    NotUtf8,
    EmptyFile,
    EmptyDocument,
    IgnoredFile,
    NoTokens,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {:?}: {}", self.file.display(), l, self.kind, self.detail),
            None => write!(f, "{}: {:?}: {}", self.file.display(), self.kind, self.detail),
        }
    }
}

/// The corpus files under `path` (a file, or a directory walked recursively), sorted by path so
/// the document order is deterministic. Files with other extensions are reported and skipped.
pub fn list_files(path: &Path, issues: &mut Vec<Issue>) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading corpus path {}", path.display()))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).with_context(|| format!("listing corpus directory {}", dir.display()))?;
        for e in rd {
            let e = e.with_context(|| format!("listing corpus directory {}", dir.display()))?;
            let p = e.path();
            let ft = e.file_type().with_context(|| format!("stat {}", p.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // hidden files (e.g. the fetch script's .done marker)
            }
            if ft.is_dir() || (ft.is_symlink() && p.is_dir()) {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("jsonl" | "json" | "txt")) {
                out.push(p);
            } else {
                issues.push(Issue {
                    file: p,
                    line: None,
                    kind: IssueKind::IgnoredFile,
                    detail: "not .jsonl/.json/.txt; ignored".into(),
                });
            }
        }
    }
    out.sort();
    Ok(out)
}

fn trim_eol(mut b: &[u8]) -> &[u8] {
    while let [rest @ .., b'\n' | b'\r'] = b {
        b = rest;
    }
    b
}

/// Reads every document under `path`, in a deterministic order, calling `sink` for each.
pub fn read_corpus(
    path: &Path,
    opts: &CorpusOptions,
    issues: &mut Vec<Issue>,
    mut sink: impl FnMut(Document) -> Result<()>,
) -> Result<()> {
    for file in list_files(path, issues)? {
        read_file(&file, opts, issues, &mut sink)?;
    }
    Ok(())
}

/// Reads one corpus file (format from its extension).
pub fn read_file(
    path: &Path,
    opts: &CorpusOptions,
    issues: &mut Vec<Issue>,
    sink: &mut dyn FnMut(Document) -> Result<()>,
) -> Result<()> {
    let is_txt = path.extension().and_then(|e| e.to_str()) == Some("txt");
    let f = File::open(path).with_context(|| format!("opening corpus file {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        issues.push(Issue { file: path.into(), line: None, kind: IssueKind::EmptyFile, detail: "empty file".into() });
        return Ok(());
    }
    let file = std::sync::Arc::new(path.to_path_buf());
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    let n_issues = issues.len();
    let mut n_docs = 0usize;
    let issue = |issues: &mut Vec<Issue>, line: usize, kind, detail: String| {
        issues.push(Issue { file: path.into(), line: Some(line), kind, detail })
    };
    // Plain-text state: the current block and where it started.
    let mut block = String::new();
    let mut block_start = 0usize;
    let mut block_bad: Option<usize> = None;
    let flush_block = |block: &mut String,
                       block_start: usize,
                       block_bad: &mut Option<usize>,
                       issues: &mut Vec<Issue>,
                       sink: &mut dyn FnMut(Document) -> Result<()>,
                       n_docs: &mut usize|
     -> Result<()> {
        if let Some(bad) = block_bad.take() {
            issue(
                issues,
                bad,
                IssueKind::NotUtf8,
                format!("invalid UTF-8; the document starting at line {block_start} is skipped"),
            );
        } else if !block.trim().is_empty() {
            let text = std::mem::take(block);
            let text = text.trim_end_matches(['\n', '\r']).to_string();
            sink(Document { source: String::new(), target: text, file: file.clone(), line: block_start })?;
            *n_docs += 1;
        }
        block.clear();
        Ok(())
    };
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if is_txt {
            match std::str::from_utf8(&buf) {
                Ok(line) if opts.txt_split == TxtSplit::BlankLine && line.trim().is_empty() => {
                    flush_block(&mut block, block_start, &mut block_bad, issues, sink, &mut n_docs)?;
                    block_start = 0;
                }
                Ok(line) => {
                    if block_start == 0 {
                        block_start = line_no;
                    }
                    block.push_str(line);
                }
                Err(_) => {
                    if block_start == 0 {
                        block_start = line_no;
                    }
                    block_bad.get_or_insert(line_no);
                }
            }
            continue;
        }
        // JSONL
        let bytes = trim_eol(&buf);
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            continue; // blank line between records
        }
        let line = match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                issue(issues, line_no, IssueKind::NotUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to()));
                continue;
            }
        };
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                issue(issues, line_no, IssueKind::InvalidJson, e.to_string());
                continue;
            }
        };
        let (source, target) = if let Some(t) = v.get("text") {
            match t.as_str() {
                Some(t) => (String::new(), t.to_string()),
                None => {
                    issue(issues, line_no, IssueKind::MissingField, "\"text\" is not a string".into());
                    continue;
                }
            }
        } else {
            match (v.get("source").map(|s| s.as_str()), v.get("target").map(|s| s.as_str())) {
                (Some(Some(s)), Some(Some(t))) => (s.to_string(), t.to_string()),
                (None, _) | (_, None) => {
                    issue(
                        issues,
                        line_no,
                        IssueKind::MissingField,
                        "needs \"text\", or \"source\" and \"target\"".into(),
                    );
                    continue;
                }
                _ => {
                    issue(issues, line_no, IssueKind::MissingField, "\"source\"/\"target\" is not a string".into());
                    continue;
                }
            }
        };
        if target.trim().is_empty() {
            let what = if source.is_empty() { "empty document" } else { "empty target (no token would carry loss)" };
            issue(issues, line_no, IssueKind::EmptyDocument, what.into());
            continue;
        }
        sink(Document { source, target, file: file.clone(), line: line_no })?;
        n_docs += 1;
    }
    if is_txt {
        flush_block(&mut block, block_start, &mut block_bad, issues, sink, &mut n_docs)?;
    }
    if n_docs == 0 && issues.len() == n_issues {
        issues.push(Issue {
            file: path.into(),
            line: None,
            kind: IssueKind::EmptyFile,
            detail: "no documents (only blank lines)".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, content: &[u8], split: TxtSplit) -> (Vec<Document>, Vec<Issue>) {
        let dir = std::env::temp_dir().join(format!("lcpt-corpus-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        let mut docs = Vec::new();
        let mut issues = Vec::new();
        read_corpus(&p, &CorpusOptions { txt_split: split }, &mut issues, |d| {
            docs.push(d);
            Ok(())
        })
        .unwrap();
        std::fs::remove_dir_all(&dir).ok();
        (docs, issues)
    }

    #[test]
    fn jsonl_kinds_and_issues() {
        let content = b"{\"text\": \"hello\"}\n\n{\"source\": \"Q?\", \"target\": \"A.\", \"category\": \"x\"}\n{bad json\n{\"foo\": 1}\n{\"text\": \"\"}\n{\"text\": \"caf\xff\"}\n{\"text\": \"last\"}";
        let (docs, issues) = read("a.jsonl", content, TxtSplit::BlankLine);
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[1].source, "Q?");
        assert_eq!(docs[1].target, "A.");
        assert_eq!(docs[2].line, 8);
        let kinds: Vec<_> = issues.iter().map(|i| (i.line, i.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (Some(4), IssueKind::InvalidJson),
                (Some(5), IssueKind::MissingField),
                (Some(6), IssueKind::EmptyDocument),
                (Some(7), IssueKind::NotUtf8)
            ]
        );
    }

    #[test]
    fn txt_blocks_and_files() {
        let content = b"para one\nline two\n\n\n para two\n\nbad \xfe here\nstill bad block\n\nok\n";
        let (docs, issues) = read("b.txt", content, TxtSplit::BlankLine);
        let texts: Vec<_> = docs.iter().map(|d| (d.line, d.target.as_str())).collect();
        assert_eq!(texts, vec![(1, "para one\nline two"), (5, " para two"), (10, "ok")]);
        assert_eq!(issues.len(), 1);
        assert_eq!((issues[0].line, issues[0].kind), (Some(7), IssueKind::NotUtf8));

        let (docs, issues) = read("c.txt", b"a\n\nb\n", TxtSplit::File);
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].target, "a\n\nb");
        assert!(issues.is_empty());

        let (docs, issues) = read("d.txt", b"", TxtSplit::File);
        assert!(docs.is_empty());
        assert_eq!(issues[0].kind, IssueKind::EmptyFile);
    }
}
