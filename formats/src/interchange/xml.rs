//! XML for libvirt and OVF: parsing through `roxmltree` (a read-only, namespace-aware tree
//! that refuses DTDs, so no entity expansion), and a small writer that escapes every text
//! and attribute value.

use std::fmt::Write as _;

use super::{err, Result};

/// Largest number of nodes a parsed document may have.
pub const MAX_NODES: u32 = 200_000;

/// Parses untrusted XML: no DTD, bounded node count. `file` labels errors.
pub fn parse<'a>(text: &'a str, file: &str) -> Result<roxmltree::Document<'a>> {
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(text, opts)
        .map_err(|e| err(file, format!("not well-formed XML: {e}")))
}

/// The qualified name of the first element in `text` (skipping the XML declaration,
/// comments and processing instructions), for format detection.
pub fn first_element_name(text: &str) -> Option<String> {
    let mut rest = text;
    loop {
        let i = rest.find('<')?;
        rest = &rest[i + 1..];
        if rest.starts_with('?') || rest.starts_with('!') {
            continue;
        }
        let end = rest.find(|c: char| c.is_whitespace() || c == '>' || c == '/')?;
        return Some(rest[..end].to_string());
    }
}

/// Children of `n` that are elements with local name `name`.
pub fn children<'a, 'i>(
    n: roxmltree::Node<'a, 'i>,
    name: &'static str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    n.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

pub fn child<'a, 'i>(
    n: roxmltree::Node<'a, 'i>,
    name: &'static str,
) -> Option<roxmltree::Node<'a, 'i>> {
    children(n, name).next()
}

/// Text of the first child element `name`, trimmed.
pub fn child_text<'a>(n: roxmltree::Node<'a, '_>, name: &'static str) -> Option<&'a str> {
    child(n, name).and_then(|c| c.text()).map(str::trim)
}

/// An attribute by local name, whatever its namespace (OVF writes `ovf:id`, some tools
/// write `id`).
pub fn attr<'a>(n: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    n.attributes().find(|a| a.name() == name).map(|a| a.value())
}

/// Escapes text for an element body or a double-quoted attribute value.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all are dropped.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => o.push(c),
        }
    }
    o
}

/// An indented XML writer: `open`/`close` for elements with children, `leaf` for the rest.
pub struct Writer {
    out: String,
    depth: usize,
    stack: Vec<String>,
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new()
    }
}

impl Writer {
    pub fn new() -> Writer {
        Writer {
            out: String::new(),
            depth: 0,
            stack: Vec::new(),
        }
    }

    pub fn declaration(&mut self) -> &mut Self {
        self.out
            .push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        self
    }

    fn start(&mut self, name: &str, attrs: &[(&str, &str)]) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
        self.out.push('<');
        self.out.push_str(name);
        for (k, v) in attrs {
            let _ = write!(self.out, " {k}=\"{}\"", esc(v));
        }
    }

    pub fn open(&mut self, name: &str, attrs: &[(&str, &str)]) -> &mut Self {
        self.start(name, attrs);
        self.out.push_str(">\n");
        self.depth += 1;
        self.stack.push(name.to_string());
        self
    }

    pub fn close(&mut self) -> &mut Self {
        let name = self.stack.pop().expect("close matches an open");
        self.depth -= 1;
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
        let _ = writeln!(self.out, "</{name}>");
        self
    }

    /// `<name attrs>text</name>`, or `<name attrs/>` when `text` is `None`.
    pub fn leaf(&mut self, name: &str, attrs: &[(&str, &str)], text: Option<&str>) -> &mut Self {
        self.start(name, attrs);
        match text {
            Some(t) => {
                let _ = writeln!(self.out, ">{}</{name}>", esc(t));
            }
            None => self.out.push_str("/>\n"),
        }
        self
    }

    pub fn finish(mut self) -> String {
        while !self.stack.is_empty() {
            self.close();
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_escapes_and_parser_refuses_dtd() {
        let mut w = Writer::new();
        w.declaration()
            .open("a", &[("x", "1\"<2")])
            .leaf("b", &[], Some("x & y"))
            .leaf("c", &[], None);
        let s = w.finish();
        let d = parse(&s, "t").unwrap();
        let a = d.root_element();
        assert_eq!(attr(a, "x"), Some("1\"<2"));
        assert_eq!(child_text(a, "b"), Some("x & y"));
        let bomb = "<!DOCTYPE a [<!ENTITY x \"xxxxxxxx\"><!ENTITY y \"&x;&x;&x;\">]><a>&y;</a>";
        assert!(parse(bomb, "t").is_err());
        assert_eq!(
            first_element_name("<?xml version='1.0'?>\n<!-- c -->\n<domain type='kvm'>"),
            Some("domain".into())
        );
    }
}
