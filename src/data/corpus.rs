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
    let mut r = BufReader::with_capacity(1 << 20, f);
    let n_issues = issues.len();
    let mut reader = FileReader { path, file: std::sync::Arc::new(path.to_path_buf()), issues, sink, n_docs: 0 };
    if is_txt {
        reader.read_txt(&mut r, opts.txt_split)?;
    } else {
        reader.read_jsonl(&mut r)?;
    }
    let n_docs = reader.n_docs;
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

/// Calls `f(line_no, bytes)` for each line of `r` (1-based, the line ending included), so that
/// a line that is not UTF-8 can be reported rather than fail the read.
fn for_each_line(r: &mut impl BufRead, path: &Path, mut f: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<()> {
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        f(line_no, &buf)?;
    }
}

/// One corpus file being read: where its documents go, and what was skipped.
struct FileReader<'a> {
    path: &'a Path,
    file: std::sync::Arc<PathBuf>,
    issues: &'a mut Vec<Issue>,
    sink: &'a mut dyn FnMut(Document) -> Result<()>,
    n_docs: usize,
}

/// A plain-text document being collected, line by line.
#[derive(Default)]
struct TxtBlock {
    text: String,
    /// Its first line (1-based); 0 before it starts.
    start: usize,
    /// Its first line that is not UTF-8.
    bad: Option<usize>,
}

impl FileReader<'_> {
    /// Records something skipped at `line`.
    fn issue(&mut self, line: usize, kind: IssueKind, detail: String) {
        self.issues.push(Issue { file: self.path.into(), line: Some(line), kind, detail })
    }

    /// Hands one document to the sink.
    fn emit(&mut self, source: String, target: String, line: usize) -> Result<()> {
        (self.sink)(Document { source, target, file: self.file.clone(), line })?;
        self.n_docs += 1;
        Ok(())
    }

    /// A `.txt` file: the whole file, or each blank-line-separated block, is one document.
    fn read_txt(&mut self, r: &mut impl BufRead, split: TxtSplit) -> Result<()> {
        // Plain-text state: the current block and where it started.
        let mut block = TxtBlock::default();
        for_each_line(r, self.path, |line_no, buf| {
            match std::str::from_utf8(buf) {
                Ok(line) if split == TxtSplit::BlankLine && line.trim().is_empty() => {
                    self.flush_block(&mut block)?;
                    block.start = 0;
                }
                Ok(line) => {
                    if block.start == 0 {
                        block.start = line_no;
                    }
                    block.text.push_str(line);
                }
                Err(_) => {
                    if block.start == 0 {
                        block.start = line_no;
                    }
                    block.bad.get_or_insert(line_no);
                }
            }
            Ok(())
        })?;
        self.flush_block(&mut block)
    }

    /// Ends the current block: a document unless it is blank or has a line that is not UTF-8.
    fn flush_block(&mut self, block: &mut TxtBlock) -> Result<()> {
        if let Some(bad) = block.bad.take() {
            let start = block.start;
            self.issue(
                bad,
                IssueKind::NotUtf8,
                format!("invalid UTF-8; the document starting at line {start} is skipped"),
            );
        } else if !block.text.trim().is_empty() {
            let text = std::mem::take(&mut block.text);
            let text = text.trim_end_matches(['\n', '\r']).to_string();
            self.emit(String::new(), text, block.start)?;
        }
        block.text.clear();
        Ok(())
    }

    /// A JSONL file: one record a line; records that cannot be used are recorded and skipped.
    fn read_jsonl(&mut self, r: &mut impl BufRead) -> Result<()> {
        for_each_line(r, self.path, |line_no, buf| {
            let bytes = trim_eol(buf);
            if bytes.iter().all(|b| b.is_ascii_whitespace()) {
                return Ok(()); // blank line between records
            }
            match parse_record(bytes) {
                Ok((source, target)) => self.emit(source, target, line_no),
                Err((kind, detail)) => {
                    self.issue(line_no, kind, detail);
                    Ok(())
                }
            }
        })
    }
}

/// One JSONL record as (source, target), or why it is skipped.
fn parse_record(bytes: &[u8]) -> std::result::Result<(String, String), (IssueKind, String)> {
    let line = std::str::from_utf8(bytes)
        .map_err(|e| (IssueKind::NotUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| (IssueKind::InvalidJson, e.to_string()))?;
    let (source, target) = if let Some(t) = v.get("text") {
        match t.as_str() {
            Some(t) => (String::new(), t.to_string()),
            None => return Err((IssueKind::MissingField, "\"text\" is not a string".into())),
        }
    } else {
        match (v.get("source").map(|s| s.as_str()), v.get("target").map(|s| s.as_str())) {
            (Some(Some(s)), Some(Some(t))) => (s.to_string(), t.to_string()),
            (None, _) | (_, None) => {
                return Err((IssueKind::MissingField, "needs \"text\", or \"source\" and \"target\"".into()))
            }
            _ => return Err((IssueKind::MissingField, "\"source\"/\"target\" is not a string".into())),
        }
    };
    if target.trim().is_empty() {
        let what = if source.is_empty() { "empty document" } else { "empty target (no token would carry loss)" };
        return Err((IssueKind::EmptyDocument, what.into()));
    }
    Ok((source, target))
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
