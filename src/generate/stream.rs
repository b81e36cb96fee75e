//! Turning generated ids into text pieces as they arrive.

use crate::chat::ChatTokenizer;
use crate::error::Result;

/// Incremental detokenizer for one conversation. Each step decodes everything generated
/// so far (SentencePiece decoders depend on neighbouring tokens) and hands out the new
/// tail; a tail that ends inside a multi-byte character (byte-fallback tokens decode to
/// U+FFFD until the character is complete) waits for the next token.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    sent: usize,
}

impl TextStream {
    /// Adds a token; returns the text that became final, if any.
    pub fn push(&mut self, tokenizer: &ChatTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        Ok(self.take(&text))
    }

    /// The text not handed out yet, given the final decoded text.
    pub fn finish(&mut self, text: &str) -> Option<String> {
        self.take(text)
    }

    fn take(&mut self, text: &str) -> Option<String> {
        if text.len() > self.sent && text.is_char_boundary(self.sent) {
            let piece = text[self.sent..].to_string();
            self.sent = text.len();
            Some(piece)
        } else {
            None
        }
    }
}
