//! One conversation as read from a dataset row, and the checks that decide whether it can
//! be trained on. A row that fails a check is dropped and counted under its [`DropReason`]
//! (or, with `strict`, is an error naming the row); never dropped silently.

use minijinja::value::Value;

/// A chat message with the roles chat templates know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Roles ferrotune trains on; any other role is a [`DropReason::UnknownRole`].
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Why a row produced no training example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// `messages` is null or an empty list.
    Empty,
    /// Only one message: nothing to learn a reply from.
    SingleMessage,
    /// No assistant message.
    NoAssistant,
    /// A role other than system/user/assistant.
    UnknownRole,
    /// A message whose content is not a string (null, number, list of parts...).
    NonStringContent,
    /// The chat template refused the conversation (`raise_exception`).
    TemplateError,
    /// Truncation to `max_seq_length` left no trainable token.
    NoTrainableTokens,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Empty,
        DropReason::SingleMessage,
        DropReason::NoAssistant,
        DropReason::UnknownRole,
        DropReason::NonStringContent,
        DropReason::TemplateError,
        DropReason::NoTrainableTokens,
    ];

    /// The key used in stats.
    pub fn key(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::SingleMessage => "single_message",
            DropReason::NoAssistant => "no_assistant",
            DropReason::UnknownRole => "unknown_role",
            DropReason::NonStringContent => "non_string_content",
            DropReason::TemplateError => "template_error",
            DropReason::NoTrainableTokens => "no_trainable_tokens",
        }
    }

    /// A sentence for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            DropReason::Empty => "the conversation has no messages",
            DropReason::SingleMessage => "the conversation has a single message",
            DropReason::NoAssistant => "the conversation has no assistant message",
            DropReason::UnknownRole => {
                "a message has a role other than 'system', 'user' or 'assistant'"
            }
            DropReason::NonStringContent => "a message's content is not a string",
            DropReason::TemplateError => "the chat template refused the conversation",
            DropReason::NoTrainableTokens => {
                "no assistant token is left after truncation to max_seq_length"
            }
        }
    }
}

/// Checks a conversation's shape (everything that does not need the tokenizer).
pub fn check_shape(messages: &[Message], non_string: bool) -> Result<(), DropReason> {
    if messages.is_empty() {
        return Err(DropReason::Empty);
    }
    if non_string {
        return Err(DropReason::NonStringContent);
    }
    if messages.iter().any(|m| !ROLES.contains(&m.role.as_str())) {
        return Err(DropReason::UnknownRole);
    }
    if messages.len() == 1 {
        return Err(DropReason::SingleMessage);
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(DropReason::NoAssistant);
    }
    Ok(())
}

/// The messages as template values (`{"role": ..., "content": ...}` maps, in that order).
pub fn to_values(messages: &[Message]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            Value::from_pairs([
                ("role", Value::from(m.role.as_str())),
                ("content", Value::from(m.content.as_str())),
            ])
        })
        .collect()
}
