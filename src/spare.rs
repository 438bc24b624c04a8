//! Header maps a worker keeps for the next request, as a connection keeps its buffers.
//!
//! Every request latchkey reads and every answer its own HTTP/1.1 client reads is given a
//! header map, two allocations each (the index and the entries), and both were freed when the
//! message had been written on. A worker serves a request start to end on one thread, so the
//! map a message no longer needs is cleared and kept here, on the thread that will build the
//! next one. What is kept is bounded: a few dozen maps per thread, each of a request's usual
//! size (a map grown by a request with many headers is freed, not kept). Clearing drops every
//! name and value the map held; what stays is the two blocks they were listed in.

use std::cell::RefCell;

use http::HeaderMap;

/// Maps kept per thread: about the requests a worker has in flight at once under load.
const KEPT: usize = 32;

/// A map that can hold more headers than this without growing is freed rather than kept (one
/// that holds none has nothing to keep).
const LARGEST_KEPT: usize = 24;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `n` headers: one kept on this thread if there is one.
pub fn header_map(n: usize) -> HeaderMap {
    let kept = SPARE.with(|spare| spare.borrow_mut().pop());
    match kept {
        Some(mut map) => {
            map.reserve(n);
            map
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// Hands back a map whose message has been written on, to be cleared and kept for the next.
pub fn keep(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > LARGEST_KEPT {
        return;
    }
    map.clear();
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < KEPT {
            spare.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HOST;
    use http::HeaderValue;

    #[test]
    fn a_kept_map_comes_back_empty_with_its_room() {
        let mut map = header_map(4);
        map.insert(HOST, HeaderValue::from_static("a.example"));
        map.append("x-one", HeaderValue::from_static("1"));
        map.append("x-one", HeaderValue::from_static("2"));
        let room = map.capacity();
        keep(map);
        let again = header_map(2);
        assert!(again.is_empty());
        assert_eq!(again.keys_len(), 0);
        assert!(again.get("x-one").is_none());
        assert_eq!(again.capacity(), room);
    }

    #[test]
    fn a_grown_map_is_not_kept() {
        let mut map = header_map(1);
        for i in 0..100 {
            map.insert(
                http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        keep(map);
        assert!(header_map(1).capacity() <= LARGEST_KEPT);
    }

    #[test]
    fn what_is_kept_is_bounded() {
        for _ in 0..KEPT * 2 {
            keep(HeaderMap::with_capacity(4));
        }
        assert_eq!(SPARE.with(|s| s.borrow().len()), KEPT);
    }
}
