//! Python semantics for chat templates, where minijinja's own differ from Jinja2's.
//!
//! Templates run under Jinja2 inside Python in `transformers`, so every value that becomes
//! text goes through Python's `str()`: lists and dicts print as their repr (`[1, 'a']`,
//! `{'k': None}`), tuples as `(1, 2)`. minijinja prints JSON-like `[1, "a"]` instead, and its
//! `%` is only arithmetic (with Rust's remainder, not Python's), where Python formats strings
//! (`'%s-%s' % (a, b)`). This module provides:
//!
//! * [`py_str`] / [`py_repr`], used by the output formatter, `|string`, `|join`, `~` and `%`;
//! * [`rewrite_operators`], which rewrites `%`, `~` and tuple literals in a template's source
//!   into calls of the helpers registered by [`install`] (minijinja has no hook for operators);
//! * the `str` / `dict` methods that `minijinja_contrib::pycompat` lacks (`rsplit`,
//!   `partition`, ...), in front of pycompat's own.

use std::fmt::Write as _;
use std::sync::Arc;

use minijinja::machinery::{ast, parse, WhitespaceConfig};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::ValueKind;
use minijinja::value::{from_args, Enumerator, Kwargs, Object, ObjectRepr, Rest};
use minijinja::{format_filter, Environment, Error, ErrorKind, FormatStyle, State, Value};

/// The global functions the rewritten source calls. Names no template uses.
const MOD_FN: &str = "__py_mod";
const CONCAT_FN: &str = "__py_concat";
const TUPLE_FN: &str = "__py_tuple";

/// Template variables the helpers reserve (a context value of that name would hide one).
pub(crate) const RESERVED_NAMES: [&str; 3] = [MOD_FN, CONCAT_FN, TUPLE_FN];

/// Register the Python-semantics helpers, filters, methods and output formatter on `env`.
pub(crate) fn install(env: &mut Environment<'static>) {
    env.add_function(MOD_FN, py_mod);
    env.add_function(CONCAT_FN, |a: &Value, b: &Value| py_str(a) + &py_str(b));
    env.add_function(TUPLE_FN, |items: Rest<Value>| PyTuple::value(items.0));
    env.add_filter("string", |v: &Value| match v.as_str() {
        Some(_) => v.clone(),
        None => Value::from(py_str(v)),
    });
    env.add_filter("join", join);
    env.add_filter("format", |fmt: &str, args: Rest<Value>| {
        printf(fmt, &args.0, None)
    });
    env.set_unknown_method_callback(methods);
    // `{{ x }}` prints `str(x)`; undefined prints nothing, as Jinja2's default Undefined.
    env.set_formatter(|out, _state, value| {
        if !value.is_undefined() {
            match value.as_str() {
                Some(s) => out.write_str(s)?,
                None => out.write_str(&py_str(value))?,
            }
        }
        Ok(())
    });
}

/// Python's `str(value)`: strings as they are, undefined as nothing, the rest as [`py_repr`].
pub(crate) fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        _ => py_repr(value),
    }
}

/// Python's `repr(value)`: `None`, `True`, `1.0`, `'text'`, `[1, 'a']`, `(1,)`, `{'k': 'v'}`.
pub(crate) fn py_repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, &mut out);
    out
}

fn write_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => out.push_str(&float_repr(
            f64::try_from(value.clone()).unwrap_or(f64::NAN),
        )),
        ValueKind::String => write_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let tuple = value.downcast_object_ref::<PyTuple>().is_some();
            let items: Vec<Value> = value.try_iter().map(|i| i.collect()).unwrap_or_default();
            out.push(if tuple { '(' } else { '[' });
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(item, out);
            }
            if tuple && items.len() == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        ValueKind::Map => {
            out.push('{');
            let keys: Vec<Value> = value.try_iter().map(|i| i.collect()).unwrap_or_default();
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(key, out);
                out.push_str(": ");
                write_repr(&value.get_item(key).unwrap_or_default(), out);
            }
            out.push('}');
        }
        // Macros, namespaces, loops: Python's reprs name their classes; minijinja's will do.
        _ => out.push_str(&value.to_string()),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, always a `.0` or an exponent, the
/// exponent form outside 1e-4 <= |x| < 1e16 (`1e-05`, `1e+16`), and `nan`, `inf`, `-inf`.
pub(crate) fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{x:e}"); // shortest digits, e.g. "1.5e-5"
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let s = x.to_string();
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Python's string repr: single quotes unless the text has `'` and no `"`, and escapes for
/// backslashes, the quote, and characters Python does not print (controls, separators,
/// format characters, private use).
fn write_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
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
            c if !is_printable(c) => {
                let n = c as u32;
                let _ = match n {
                    0..=0xff => write!(out, "\\x{n:02x}"),
                    0x100..=0xffff => write!(out, "\\u{n:04x}"),
                    _ => write!(out, "\\U{n:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for the characters that occur in practice: Unicode's
/// control, separator (but space), format and private-use characters are not printable.
/// Unassigned code points would need Unicode's tables and are taken as printable.
fn is_printable(c: char) -> bool {
    !matches!(c as u32,
        0..=0x1f | 0x7f..=0xa0 | 0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x1680
        | 0x180e | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x2066..=0x206f
        | 0x3000 | 0xe000..=0xf8ff | 0xfeff | 0xfff9..=0xfffb | 0xf0000..=0x10ffff)
}

/// A Python tuple: a sequence that prints as `(a, b)`, and that `%` takes as its argument
/// list (a list on the right of `%` is one argument, as in Python).
#[derive(Debug)]
struct PyTuple(Vec<Value>);

impl PyTuple {
    fn value(items: Vec<Value>) -> Value {
        Value::from_object(PyTuple(items))
    }
}

impl Object for PyTuple {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_usize()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.0.len())
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&py_repr(&Value::from_dyn_object(self.clone())))
    }
}

fn type_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// Python's name of a value's type, for error messages.
fn py_type(v: &Value) -> &'static str {
    match v.kind() {
        ValueKind::Undefined => "Undefined",
        ValueKind::None => "NoneType",
        ValueKind::Bool => "bool",
        ValueKind::Number if v.is_integer() => "int",
        ValueKind::Number => "float",
        ValueKind::String => "str",
        ValueKind::Bytes => "bytes",
        ValueKind::Seq if v.downcast_object_ref::<PyTuple>().is_some() => "tuple",
        ValueKind::Seq | ValueKind::Iterable => "list",
        ValueKind::Map => "dict",
        _ => "object",
    }
}

/// `a % b` as Python computes it: string formatting for a string on the left, otherwise
/// the modulo whose sign follows the divisor (`7 % -3 == -2`, `-7.5 % 2 == 0.5`).
fn py_mod(lhs: &Value, rhs: &Value) -> Result<Value, Error> {
    if let Some(fmt) = lhs.as_str() {
        return match rhs.downcast_object_ref::<PyTuple>() {
            Some(tuple) => printf(fmt, &tuple.0, None),
            None if rhs.kind() == ValueKind::Map => {
                printf(fmt, std::slice::from_ref(rhs), Some(rhs))
            }
            None => printf(fmt, std::slice::from_ref(rhs), None),
        }
        .map(Value::from);
    }
    let numeric = |v: &Value| matches!(v.kind(), ValueKind::Number | ValueKind::Bool);
    if !numeric(lhs) || !numeric(rhs) {
        return Err(type_error(format!(
            "unsupported operand type(s) for %: '{}' and '{}'",
            py_type(lhs),
            py_type(rhs)
        )));
    }
    if lhs.is_integer() && rhs.is_integer() || lhs.kind() == ValueKind::Bool {
        if let (Ok(a), Ok(b)) = (i128::try_from(lhs.clone()), i128::try_from(rhs.clone())) {
            if b == 0 {
                return Err(type_error("integer modulo by zero"));
            }
            let r = a % b;
            let r = if r != 0 && (r < 0) != (b < 0) {
                r + b
            } else {
                r
            };
            return Ok(Value::from(r));
        }
    }
    let (a, b) = (f64::try_from(lhs.clone())?, f64::try_from(rhs.clone())?);
    if b == 0.0 {
        return Err(type_error("float modulo"));
    }
    let r = a % b;
    Ok(Value::from(if r != 0.0 && (r < 0.0) != (b < 0.0) {
        r + b
    } else {
        r
    }))
}

/// Python's `fmt % args`. The directives are found here (to pick each one's argument, turn
/// `%s` / `%r` into Python's `str` / `repr`, and count the arguments as Python does); each
/// is then formatted by minijinja's own printf-style formatter (padding, precision, bases).
fn printf(fmt: &str, args: &[Value], mapping: Option<&Value>) -> Result<String, Error> {
    let mut out = String::new();
    let mut next_arg = 0;
    let mut rest = fmt;
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        let mut chars = rest[pos + 1..].char_indices().peekable();
        let mut key = None;
        let mut spec = String::from("%");
        if let Some((_, '(')) = chars.peek() {
            chars.next();
            let start = pos + 2;
            let end = loop {
                match chars.next() {
                    Some((i, ')')) => break pos + 1 + i,
                    Some(_) => {}
                    None => return Err(type_error("incomplete format key")),
                }
            };
            key = Some(&rest[start..end]);
        }
        let (ty, after) = loop {
            match chars.next() {
                None => return Err(type_error("incomplete format")),
                Some((_, '*')) => {
                    return Err(type_error(
                        "`*` width or precision in % formatting is not supported",
                    ))
                }
                Some((_, 'h' | 'l' | 'L')) => {}
                Some((_, c @ ('#' | '0'..='9' | '-' | ' ' | '+' | '.'))) => spec.push(c),
                Some((i, c)) => break (c, pos + 1 + i + c.len_utf8()),
            }
        };
        rest = &rest[after..];
        if ty == '%' {
            out.push('%');
            continue;
        }
        let arg = match key {
            Some(k) => {
                let map = mapping.ok_or_else(|| type_error("format requires a mapping"))?;
                let v = map.get_item(&Value::from(k)).unwrap_or_default();
                if v.is_undefined() {
                    return Err(type_error(format!("KeyError: '{k}'")));
                }
                v
            }
            None => {
                let v = args
                    .get(next_arg)
                    .cloned()
                    .ok_or_else(|| type_error("not enough arguments for format string"))?;
                next_arg += 1;
                v
            }
        };
        let (arg, ty) = match ty {
            's' => (Value::from(py_str(&arg)), 's'),
            'r' | 'a' => (Value::from(py_repr(&arg)), 's'),
            'd' | 'i' | 'u' => {
                if !matches!(arg.kind(), ValueKind::Number | ValueKind::Bool) {
                    return Err(type_error(format!(
                        "%{ty} format: a real number is required, not {}",
                        py_type(&arg)
                    )));
                }
                let truncated = match arg.is_integer() || arg.kind() == ValueKind::Bool {
                    true => arg,
                    false => Value::from(f64::try_from(arg)?.trunc() as i128),
                };
                (truncated, 'd')
            }
            'o' | 'x' | 'X' | 'e' | 'E' | 'f' | 'F' | 'g' | 'G' | 'c' => (arg, ty),
            other => {
                return Err(type_error(format!(
                    "unsupported format character '{other}' ({:#x})",
                    other as u32
                )))
            }
        };
        spec.push(ty);
        out.push_str(&format_filter(FormatStyle::Printf, &spec, &[arg])?);
    }
    out.push_str(rest);
    if mapping.is_none() && next_arg < args.len() {
        return Err(type_error(
            "not all arguments converted during string formatting",
        ));
    }
    Ok(out)
}

/// Jinja2's `join(d='', attribute=None)`: `str()` of each item between the separators.
fn join(value: &Value, sep: Option<&str>, kwargs: Kwargs) -> Result<String, Error> {
    let attribute: Option<Value> = kwargs.get("attribute")?;
    let sep = match sep {
        Some(s) => s.to_string(),
        None => kwargs.get::<Option<String>>("d")?.unwrap_or_default(),
    };
    kwargs.assert_all_used()?;
    if value.is_undefined() {
        return Ok(String::new());
    }
    let mut parts = Vec::new();
    for item in value.try_iter()? {
        let item = match &attribute {
            Some(attr) => match attr.as_str() {
                Some(path) => path.split('.').try_fold(item, |v, key| v.get_attr(key))?,
                None => item.get_item(attr)?,
            },
            None => item,
        };
        parts.push(py_str(&item));
    }
    Ok(parts.join(&sep))
}

/// Methods pycompat lacks or gets wrong for templates, then pycompat's own.
fn methods(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        match method {
            "rsplit" => return rsplit(s, args),
            "partition" | "rpartition" => {
                let (sep,): (&str,) = from_args(args)?;
                if sep.is_empty() {
                    return Err(type_error("empty separator"));
                }
                let found = if method == "partition" {
                    s.find(sep)
                } else {
                    s.rfind(sep)
                };
                let parts = match (found, method) {
                    (Some(i), _) => [&s[..i], sep, &s[i + sep.len()..]],
                    (None, "partition") => [s, "", ""],
                    (None, _) => ["", "", s],
                };
                return Ok(PyTuple::value(
                    parts.iter().map(|p| Value::from(*p)).collect(),
                ));
            }
            "removeprefix" => {
                let (p,): (&str,) = from_args(args)?;
                return Ok(Value::from(s.strip_prefix(p).unwrap_or(s)));
            }
            "removesuffix" => {
                let (p,): (&str,) = from_args(args)?;
                return Ok(Value::from(s.strip_suffix(p).unwrap_or(s)));
            }
            _ => {}
        }
    }
    // Python's pairs are tuples: `{{ d.items()|list }}` prints `[('k', 'v')]`.
    if value.kind() == ValueKind::Map && method == "items" {
        let () = from_args(args)?;
        let pairs = value
            .try_iter()?
            .map(|k| {
                let v = value.get_item(&k).unwrap_or_default();
                PyTuple::value(vec![k, v])
            })
            .collect::<Vec<_>>();
        return Ok(Value::from(pairs));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `str.rsplit(sep=None, maxsplit=-1)`, positional or by keyword.
fn rsplit(s: &str, args: &[Value]) -> Result<Value, Error> {
    let (sep, maxsplit, kwargs): (Option<Value>, Option<i64>, Kwargs) = from_args(args)?;
    let sep = match kwargs.get::<Option<Value>>("sep")? {
        Some(v) => Some(v),
        None => sep,
    };
    let maxsplit = kwargs
        .get::<Option<i64>>("maxsplit")?
        .or(maxsplit)
        .unwrap_or(-1);
    kwargs.assert_all_used()?;
    let limit = usize::try_from(maxsplit).unwrap_or(usize::MAX);
    let mut parts: Vec<&str> = Vec::new();
    match sep.as_ref().filter(|v| !v.is_none()) {
        Some(sep) => {
            let sep = sep
                .as_str()
                .ok_or_else(|| type_error("rsplit: sep must be a string or None"))?;
            if sep.is_empty() {
                return Err(type_error("empty separator"));
            }
            parts.extend(s.rsplitn(limit.saturating_add(1), sep));
        }
        // Runs of whitespace separate; what is left unsplit keeps its leading whitespace.
        None => {
            let mut rest = s.trim_end();
            while !rest.is_empty() {
                if parts.len() == limit {
                    parts.push(rest);
                    break;
                }
                match rest.char_indices().rev().find(|(_, c)| c.is_whitespace()) {
                    Some((i, c)) => {
                        parts.push(&rest[i + c.len_utf8()..]);
                        rest = rest[..i].trim_end();
                    }
                    None => {
                        parts.push(rest);
                        break;
                    }
                }
            }
        }
    }
    parts.reverse();
    Ok(Value::from(
        parts.into_iter().map(Value::from).collect::<Vec<_>>(),
    ))
}

/// Rewrite the Python operators minijinja would evaluate differently into calls of the
/// helpers [`install`] registers: `a % b` becomes `__py_mod(a, b)`, `a ~ b` becomes
/// `__py_concat(a, b)`, and a tuple literal `(a, b)` becomes `__py_tuple(a, b)`.
///
/// minijinja offers no hook for operators, so the template's own syntax tree (minijinja's
/// parser, through its `unstable_machinery` API) locates each operator and its operands;
/// only those few characters change, so everything else, line numbers included, stays as
/// written. Assignment targets (`for a, b in`, `set x`) are left alone.
pub(crate) fn rewrite_operators(source: &str) -> Result<String, Error> {
    let ws = WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    // A unit struct unless some crate turns on minijinja's `custom_syntax`.
    #[allow(clippy::default_constructed_unit_structs)]
    let syntax = SyntaxConfig::default();
    let tree = parse(source, "chat_template", syntax, ws)?;
    let mut edits = Vec::new();
    Rewriter {
        src: source,
        edits: &mut edits,
    }
    .stmt(&tree)?;
    // At one offset: closing parentheses first, then an operator, then openings in the
    // order found (outer before inner); the sort is stable.
    edits.sort_by_key(|e| (e.at, e.rank));
    let mut out = String::with_capacity(source.len() + edits.len() * 12);
    let mut copied = 0;
    for e in edits {
        out.push_str(&source[copied..e.at]);
        out.push_str(&e.text);
        copied = e.at + e.remove;
    }
    out.push_str(&source[copied..]);
    Ok(out)
}

struct Edit {
    at: usize,
    rank: u8,
    remove: usize,
    text: String,
}

struct Rewriter<'s, 'e> {
    src: &'s str,
    edits: &'e mut Vec<Edit>,
}

impl Rewriter<'_, '_> {
    fn insert(&mut self, at: u32, rank: u8, text: &str) {
        self.edits.push(Edit {
            at: at as usize,
            rank,
            remove: 0,
            text: text.into(),
        });
    }

    fn stmts(&mut self, body: &[ast::Stmt]) -> Result<(), Error> {
        body.iter().try_for_each(|s| self.stmt(s))
    }

    fn stmt(&mut self, stmt: &ast::Stmt) -> Result<(), Error> {
        match stmt {
            ast::Stmt::Template(t) => self.stmts(&t.children),
            ast::Stmt::EmitExpr(e) => self.expr(&e.expr),
            ast::Stmt::EmitRaw(_) | ast::Stmt::Continue(_) | ast::Stmt::Break(_) => Ok(()),
            ast::Stmt::ForLoop(f) => {
                self.expr(&f.iter)?;
                self.opt(&f.filter_expr)?;
                self.stmts(&f.body)?;
                self.stmts(&f.else_body)
            }
            ast::Stmt::IfCond(c) => {
                self.expr(&c.expr)?;
                self.stmts(&c.true_body)?;
                self.stmts(&c.false_body)
            }
            ast::Stmt::WithBlock(w) => {
                w.assignments
                    .iter()
                    .try_for_each(|(_, value)| self.expr(value))?;
                self.stmts(&w.body)
            }
            ast::Stmt::Set(s) => self.expr(&s.expr),
            ast::Stmt::SetBlock(s) => {
                self.opt(&s.filter)?;
                self.stmts(&s.body)
            }
            ast::Stmt::AutoEscape(a) => {
                self.expr(&a.enabled)?;
                self.stmts(&a.body)
            }
            ast::Stmt::FilterBlock(f) => {
                self.expr(&f.filter)?;
                self.stmts(&f.body)
            }
            ast::Stmt::Block(b) => self.stmts(&b.body),
            ast::Stmt::Import(i) => self.expr(&i.expr),
            ast::Stmt::FromImport(i) => self.expr(&i.expr),
            ast::Stmt::Extends(e) => self.expr(&e.name),
            ast::Stmt::Include(i) => self.expr(&i.name),
            ast::Stmt::Macro(m) => self.macro_decl(m),
            ast::Stmt::CallBlock(c) => {
                self.call(&c.call)?;
                self.macro_decl(&c.macro_decl)
            }
            ast::Stmt::Do(d) => self.call(&d.call),
        }
    }

    fn macro_decl(&mut self, m: &ast::Macro) -> Result<(), Error> {
        m.defaults.iter().try_for_each(|d| self.expr(d))?;
        self.stmts(&m.body)
    }

    fn call(&mut self, c: &ast::Call) -> Result<(), Error> {
        self.expr(&c.expr)?;
        self.args(&c.args)
    }

    fn args(&mut self, args: &[ast::CallArg]) -> Result<(), Error> {
        args.iter().try_for_each(|a| match a {
            ast::CallArg::Pos(e)
            | ast::CallArg::Kwarg(_, e)
            | ast::CallArg::PosSplat(e)
            | ast::CallArg::KwargSplat(e) => self.expr(e),
        })
    }

    fn opt(&mut self, e: &Option<ast::Expr>) -> Result<(), Error> {
        e.as_ref().map_or(Ok(()), |e| self.expr(e))
    }

    fn expr(&mut self, expr: &ast::Expr) -> Result<(), Error> {
        match expr {
            ast::Expr::Var(_) | ast::Expr::Const(_) => Ok(()),
            ast::Expr::Slice(s) => {
                self.expr(&s.expr)?;
                self.opt(&s.start)?;
                self.opt(&s.stop)?;
                self.opt(&s.step)
            }
            ast::Expr::UnaryOp(u) => self.expr(&u.expr),
            ast::Expr::BinOp(b) => {
                let helper = match b.op {
                    ast::BinOpKind::Rem => Some((MOD_FN, '%')),
                    ast::BinOpKind::Concat => Some((CONCAT_FN, '~')),
                    _ => None,
                };
                if let Some((name, op)) = helper {
                    let span = expr.span();
                    self.insert(span.start_offset, 2, &format!("{name}("));
                    // The operator follows the left operand, maybe after its `)`.
                    let from = b.left.span().end_offset as usize;
                    let at = self.src[from..]
                        .find(|c: char| !c.is_whitespace() && c != ')')
                        .map(|i| from + i)
                        .filter(|&i| self.src[i..].starts_with(op))
                        .ok_or_else(|| {
                            Error::new(
                                ErrorKind::SyntaxError,
                                format!("cannot find the `{op}` operator at offset {from}"),
                            )
                        })?;
                    self.edits.push(Edit {
                        at,
                        rank: 1,
                        remove: 1,
                        text: ",".into(),
                    });
                    self.insert(span.end_offset, 0, ")");
                }
                self.expr(&b.left)?;
                self.expr(&b.right)
            }
            ast::Expr::Compare(c) => {
                self.expr(&c.expr)?;
                c.ops.iter().try_for_each(|op| self.expr(&op.expr))
            }
            ast::Expr::IfExpr(i) => {
                self.expr(&i.test_expr)?;
                self.expr(&i.true_expr)?;
                self.opt(&i.false_expr)
            }
            ast::Expr::Filter(f) => {
                self.opt(&f.expr)?;
                self.args(&f.args)
            }
            ast::Expr::Test(t) => {
                self.expr(&t.expr)?;
                self.args(&t.args)
            }
            ast::Expr::GetAttr(g) => self.expr(&g.expr),
            ast::Expr::GetItem(g) => {
                self.expr(&g.expr)?;
                self.expr(&g.subscript_expr)
            }
            ast::Expr::Call(c) => self.call(c),
            ast::Expr::List(l) => {
                let span = expr.span();
                let first = l.items.first().map_or(span, |i| i.span());
                if first.start_offset < span.start_offset {
                    // A tuple without parentheses (`set x = a, b`): its span starts after
                    // the first comma, so it opens before the first item, and before any
                    // `(` of that item's, which only whitespace and `(` separate from `=`.
                    let before = &self.src[..first.start_offset as usize];
                    let opening = before.trim_end_matches(|c: char| c.is_whitespace() || c == '(');
                    let start = before.len() - before[opening.len()..].trim_start().len();
                    self.insert(start as u32, 2, &format!("{TUPLE_FN}("));
                    self.insert(span.end_offset, 0, ")");
                } else if self.src[span.start_offset as usize..].starts_with('(') {
                    // `(a, b)`: the parentheses become the call's.
                    self.insert(span.start_offset, 2, TUPLE_FN);
                }
                l.items.iter().try_for_each(|i| self.expr(i))
            }
            ast::Expr::Map(m) => {
                m.keys.iter().try_for_each(|k| self.expr(k))?;
                m.values.iter().try_for_each(|v| self.expr(v))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the operators and the tuples' openings change; text, other syntax and line
    /// breaks stay as written, so errors still point at the template's own lines.
    #[test]
    fn rewrite_touches_only_operators_and_tuples() {
        let cases = [
            ("{{ 'é%s' % x }}", "{{ __py_mod('é%s' , x) }}"),
            (
                "{{ (a) % (b, c) }}",
                "{{ __py_mod((a) , __py_tuple(b, c)) }}",
            ),
            (
                "{{ a ~ b % c ~ d }}",
                "{{ __py_concat(__py_concat(a , __py_mod(b , c)) , d) }}",
            ),
            (
                "{% for k, v in x %}{{ k }}{% endfor %}",
                "{% for k, v in x %}{{ k }}{% endfor %}",
            ),
            ("{% set t = a, b %}", "{% set t = __py_tuple(a, b) %}"),
            (
                "{{ [1, 2] }}\n{{ 100 / 5 }} raw % ~ (x, y)",
                "{{ [1, 2] }}\n{{ 100 / 5 }} raw % ~ (x, y)",
            ),
            (
                "{% if x %}\n{{ -n % 2 }}{% endif %}",
                "{% if x %}\n{{ __py_mod(-n , 2) }}{% endif %}",
            ),
        ];
        for (src, expected) in cases {
            assert_eq!(rewrite_operators(src).unwrap(), expected, "{src}");
        }
        assert!(rewrite_operators("{{ 'a' % }}").is_err());
    }

    #[test]
    fn reprs_follow_python() {
        assert_eq!(
            py_repr(&Value::from("a\u{a0}\u{200b}😀\u{7f}")),
            r"'a\xa0\u200b😀\x7f'"
        );
        assert_eq!(
            py_repr(&Value::from(vec![Value::from(1.5e-7)])),
            "[1.5e-07]"
        );
        assert_eq!(py_repr(&PyTuple::value(vec![])), "()");
        assert_eq!(float_repr(f64::NEG_INFINITY), "-inf");
        assert_eq!(py_str(&Value::UNDEFINED), "");
    }
}
