//! Aligned text tables for the terminal (comfy-table): no borders, a rule under the header,
//! every line indented, trailing blanks trimmed, never wrapped (logs and pipes get the same
//! text as a terminal).

use comfy_table::{CellAlignment, Table};

/// Only the line under the header (comfy-table's preset string: the sixth character is the
/// header rule, a blank means "not drawn").
const HEADER_RULE_ONLY: &str = "     -             ";

/// A table whose first `left` columns are aligned left and the others right (numbers).
pub struct TextTable {
    table: Table,
    left: usize,
    /// Further columns aligned left (text after the numbers).
    also_left: Vec<usize>,
}

impl TextTable {
    pub fn new<S: ToString>(header: impl IntoIterator<Item = S>, left: usize) -> TextTable {
        let mut table = Table::new();
        table.load_preset(HEADER_RULE_ONLY);
        table.set_header(header.into_iter().map(|h| h.to_string()).collect::<Vec<_>>());
        TextTable { table, left, also_left: Vec::new() }
    }

    /// Aligns column `col` left too.
    pub fn left(mut self, col: usize) -> Self {
        self.also_left.push(col);
        self
    }

    /// Appends a row (fewer cells than columns leave the rest empty).
    pub fn row<S: ToString>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Self {
        self.table.add_row(cells.into_iter().map(|c| c.to_string()).collect::<Vec<_>>());
        self
    }

    /// The table, each line indented by `indent` spaces and ending in a newline.
    pub fn render(&mut self, indent: usize) -> String {
        let columns = self.table.column_count();
        for i in (self.left..columns).filter(|i| !self.also_left.contains(i)) {
            if let Some(c) = self.table.column_mut(i) {
                c.set_cell_alignment(CellAlignment::Right);
            }
        }
        let pad = " ".repeat(indent);
        self.table.lines().map(|l| format!("{pad}{}\n", l.trim_end())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_numbers_right_under_a_rule() {
        let mut t = TextTable::new(["metric", "value"], 1);
        t.row(["Safe@1", "100.00"]).row(["F-score", "7.5"]);
        let text = t.render(2);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines.iter().all(|l| l.starts_with("  ") && !l.ends_with(' ')), "{text}");
        assert!(lines[0].contains("metric") && lines[1].trim_start().starts_with('-'), "{text}");
        // Right-aligned: the values end in the same column.
        assert_eq!(lines[2].len(), lines[3].len(), "{text}");
        assert!(lines[3].ends_with("    7.5"), "{text}");
    }
}
