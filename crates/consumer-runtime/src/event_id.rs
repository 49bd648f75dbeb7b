//! Where a record's event id (its key in the dedup ledger) comes from.

use std::sync::Arc;

/// A function that computes an event id from a decoded event.
pub type EventIdFn<E> = Arc<dyn Fn(&E) -> Option<String> + Send + Sync>;

/// The event-id strategy: a header, a function over the decoded event, or the record's
/// coordinates.
pub enum EventId<E> {
    /// The value of a header (UTF-8). The default, with the header `event-id`.
    Header(String),
    /// A business idempotency key computed from the decoded event (for example an order id and
    /// a version). Returning `None` marks the record as having no id.
    FromEvent(EventIdFn<E>),
    /// `topic/partition/offset`. The last resort: it makes replays and restarts safe, but it
    /// **cannot** catch producer-side duplicates, which land at different offsets.
    Coordinates,
}

impl<E> EventId<E> {
    /// Reads the id from the header `name`.
    pub fn header(name: impl Into<String>) -> Self {
        EventId::Header(name.into())
    }

    /// Computes the id from the decoded event.
    pub fn from_event(f: impl Fn(&E) -> Option<String> + Send + Sync + 'static) -> Self {
        EventId::FromEvent(Arc::new(f))
    }

    /// Uses `topic/partition/offset` as the id.
    pub fn coordinates() -> Self {
        EventId::Coordinates
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            EventId::Header(h) => format!("header `{h}`"),
            EventId::FromEvent(_) => "a function of the event".to_owned(),
            EventId::Coordinates => "record coordinates".to_owned(),
        }
    }
}

impl<E> Default for EventId<E> {
    fn default() -> Self {
        EventId::Header("event-id".to_owned())
    }
}

impl<E> Clone for EventId<E> {
    fn clone(&self) -> Self {
        match self {
            EventId::Header(h) => EventId::Header(h.clone()),
            EventId::FromEvent(f) => EventId::FromEvent(f.clone()),
            EventId::Coordinates => EventId::Coordinates,
        }
    }
}

impl<E> std::fmt::Debug for EventId<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}
