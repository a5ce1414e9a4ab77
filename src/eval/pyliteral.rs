//! Python literals as `ast.literal_eval` reads them (dicts, lists, tuples, strings, numbers,
//! `None`, `True`, `False`), for AGIEval's few-shot file, whose cells are Python dict reprs.
use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

/// Parses one literal (the whole of `text`, surrounding whitespace allowed).
pub fn parse(text: &str) -> Result<Value> {
    let mut p = Parser { chars: text.chars().collect(), at: 0 };
    let v = p.value()?;
    p.skip_space();
    if p.at < p.chars.len() {
        bail!("unexpected {:?} after the literal at character {}", p.chars[p.at], p.at);
    }
    Ok(v)
}

/// `str(value)` in Python for what [`parse`] returns: strings as they are, lists as their repr.
pub fn python_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => python_repr(other),
    }
}

fn python_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string_repr(s),
        Value::Array(a) => format!("[{}]", a.iter().map(python_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => {
            let items: Vec<String> = o.iter().map(|(k, v)| format!("{}: {}", string_repr(k), python_repr(v))).collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text holds a `'` and no `"`.
fn string_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::from(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn expect(&mut self, c: char) -> Result<()> {
        self.skip_space();
        if self.peek() != Some(c) {
            bail!("expected {c:?} at character {}, found {:?}", self.at, self.peek());
        }
        self.at += 1;
        Ok(())
    }

    fn value(&mut self) -> Result<Value> {
        self.skip_space();
        match self.peek().ok_or_else(|| anyhow!("the literal ends early"))? {
            '{' => self.dict(),
            '[' => Ok(Value::Array(self.sequence('[', ']')?)),
            '(' => Ok(Value::Array(self.sequence('(', ')')?)),
            '\'' | '"' => {
                // Adjacent literals concatenate, as in Python source.
                let mut s = self.string()?;
                loop {
                    self.skip_space();
                    match self.peek() {
                        Some('\'' | '"') => s.push_str(&self.string()?),
                        _ => return Ok(Value::String(s)),
                    }
                }
            }
            _ => self.word(),
        }
    }

    fn dict(&mut self) -> Result<Value> {
        self.expect('{')?;
        let mut map = Map::new();
        loop {
            self.skip_space();
            if self.peek() == Some('}') {
                self.at += 1;
                return Ok(Value::Object(map));
            }
            let key = match self.value()? {
                Value::String(s) => s,
                other => other.to_string(),
            };
            self.expect(':')?;
            map.insert(key, self.value()?);
            self.skip_space();
            match self.peek() {
                Some(',') => self.at += 1,
                Some('}') => {}
                other => bail!("expected ',' or '}}' at character {}, found {other:?}", self.at),
            }
        }
    }

    fn sequence(&mut self, open: char, close: char) -> Result<Vec<Value>> {
        self.expect(open)?;
        let mut items = Vec::new();
        loop {
            self.skip_space();
            if self.peek() == Some(close) {
                self.at += 1;
                return Ok(items);
            }
            items.push(self.value()?);
            self.skip_space();
            match self.peek() {
                Some(',') => self.at += 1,
                Some(c) if c == close => {}
                other => bail!("expected ',' or {close:?} at character {}, found {other:?}", self.at),
            }
        }
    }

    /// A single- or double-quoted string with Python's escapes (an unknown escape keeps its
    /// backslash, as Python does).
    fn string(&mut self) -> Result<String> {
        let quote = self.chars[self.at];
        let start = self.at;
        self.at += 1;
        let mut out = String::new();
        loop {
            let c = self.peek().ok_or_else(|| anyhow!("string from character {start} is not closed"))?;
            self.at += 1;
            if c == quote {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let e = self.peek().ok_or_else(|| anyhow!("string from character {start} ends in a backslash"))?;
            self.at += 1;
            match e {
                '\n' => {}
                '\\' | '\'' | '"' => out.push(e),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '0' => out.push('\0'),
                'a' => out.push('\u{7}'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'v' => out.push('\u{b}'),
                'x' => out.push(self.code_point(2)?),
                'u' => out.push(self.code_point(4)?),
                'U' => out.push(self.code_point(8)?),
                other => {
                    out.push('\\');
                    out.push(other);
                }
            }
        }
    }

    fn code_point(&mut self, digits: usize) -> Result<char> {
        let hex: String = self.chars.get(self.at..self.at + digits).unwrap_or(&[]).iter().collect();
        self.at += digits;
        u32::from_str_radix(&hex, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| anyhow!("bad escape \\{hex:?} at character {}", self.at - digits))
    }

    /// `None`, `True`, `False` or a number.
    fn word(&mut self) -> Result<Value> {
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '+' | '_')) {
            self.at += 1;
        }
        let w: String = self.chars[start..self.at].iter().collect();
        Ok(match w.as_str() {
            "None" => Value::Null,
            "True" => Value::Bool(true),
            "False" => Value::Bool(false),
            _ => {
                let digits = w.replace('_', "");
                match digits.parse::<i64>() {
                    Ok(n) => Value::from(n),
                    Err(_) => Value::from(
                        digits.parse::<f64>().map_err(|_| anyhow!("unknown literal {w:?} at character {start}"))?,
                    ),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agieval_cells_parse_as_python_reads_them() {
        let v = parse(r#"{'passage': None, 'question': "It's \"x\"\u3000y", 'options': ['(A)1', '(B)2'], 'label': ['A', 'D'], 'other': {'n': 3}}"#).unwrap();
        assert_eq!(v["passage"], Value::Null);
        assert_eq!(v["question"], "It's \"x\"\u{3000}y");
        assert_eq!(v["options"][1], "(B)2");
        assert_eq!(python_str(&v["label"]), "['A', 'D']");
        assert_eq!(v["other"]["n"], 3);
        assert_eq!(parse(r"'a\'b\\c\q'").unwrap(), "a'b\\c\\q");
        assert_eq!(python_str(&parse(r#"["it's"]"#).unwrap()), "[\"it's\"]");
        assert!(parse("{'a': 1").is_err());
        assert!(parse("{'a': 1} x").is_err());
    }
}
