//! Timeline history files (`00000002.history`): which timeline a cluster was on, and at which
//! LSN it switched to the next one.

use crate::{Lsn, PitrError};

/// One timeline on the way to another: it holds WAL from `begin` up to (not including) `end`;
/// the last timeline of a path has no end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineSpan {
    pub timeline: u32,
    pub begin: Lsn,
    pub end: Option<Lsn>,
}

/// The ancestry of one timeline, oldest first, ending with the timeline itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePath(Vec<TimelineSpan>);

impl TimelinePath {
    /// The path of timeline 1, which has no history file.
    pub fn first() -> Self {
        TimelinePath(vec![TimelineSpan {
            timeline: 1,
            begin: Lsn(0),
            end: None,
        }])
    }

    /// Reads the history file of `timeline`. Each line is `parent_tli<TAB>switch_lsn<TAB>reason`;
    /// blank lines and `#` comments are skipped, as PostgreSQL does.
    pub fn parse(timeline: u32, text: &str) -> Result<Self, PitrError> {
        let bad = |line: &str| PitrError::BadHistory(timeline, line.to_string());
        let mut spans: Vec<TimelineSpan> = Vec::new();
        let mut begin = Lsn(0);
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let parent: u32 = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad(line))?;
            let switch: Lsn = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad(line))?;
            let ordered = spans
                .last()
                .is_none_or(|last| last.timeline < parent && begin <= switch);
            if !ordered || parent >= timeline {
                return Err(bad(line));
            }
            spans.push(TimelineSpan {
                timeline: parent,
                begin,
                end: Some(switch),
            });
            begin = switch;
        }
        spans.push(TimelineSpan {
            timeline,
            begin,
            end: None,
        });
        Ok(TimelinePath(spans))
    }

    pub fn spans(&self) -> &[TimelineSpan] {
        &self.0
    }

    /// The timeline this path leads to.
    pub fn target(&self) -> u32 {
        self.0.last().map_or(1, |span| span.timeline)
    }

    /// The span of `timeline` on this path, if the path goes through it.
    pub fn span_of(&self, timeline: u32) -> Option<&TimelineSpan> {
        self.0.iter().find(|span| span.timeline == timeline)
    }

    /// Whether recovery that starts on `timeline` at `lsn` can follow this path: the timeline
    /// is on it, and it did not switch away before `lsn`.
    pub fn continues_from(&self, timeline: u32, lsn: Lsn) -> bool {
        self.span_of(timeline)
            .is_some_and(|span| span.end.is_none_or(|end| lsn <= end))
    }

    /// The timeline that holds `lsn` on this path (the newest span that began at or before it).
    pub fn timeline_at(&self, lsn: Lsn) -> u32 {
        self.0
            .iter()
            .rev()
            .find(|span| span.begin <= lsn)
            .map_or(self.target(), |span| span.timeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HISTORY_3: &str = "1\t0/3000158\tno recovery target specified\n\n\
        # a comment\n2\t0/50000A0\tbefore 2026-01-15 10:30:00+00\n";

    #[test]
    fn a_history_file_becomes_a_path_of_spans() {
        let path = TimelinePath::parse(3, HISTORY_3).unwrap();
        let lsn = |s: &str| s.parse::<Lsn>().unwrap();
        assert_eq!(
            path.spans(),
            &[
                TimelineSpan {
                    timeline: 1,
                    begin: Lsn(0),
                    end: Some(lsn("0/3000158"))
                },
                TimelineSpan {
                    timeline: 2,
                    begin: lsn("0/3000158"),
                    end: Some(lsn("0/50000A0"))
                },
                TimelineSpan {
                    timeline: 3,
                    begin: lsn("0/50000A0"),
                    end: None
                },
            ]
        );
        assert_eq!(path.target(), 3);
        assert!(path.continues_from(1, lsn("0/2000028")));
        assert!(!path.continues_from(1, lsn("0/4000028")));
        assert!(path.continues_from(3, lsn("9/0")));
        assert!(!path.continues_from(4, lsn("0/1")));
        assert_eq!(path.timeline_at(lsn("0/3000158")), 2);
        assert_eq!(path.timeline_at(lsn("0/3000157")), 1);
        assert_eq!(TimelinePath::first().target(), 1);
    }

    #[test]
    fn malformed_or_disordered_history_is_refused() {
        for text in [
            "x\t0/1\treason",
            "1\tnot-an-lsn",
            "2\t0/1\n1\t0/2",
            "1\t0/5\n2\t0/4",
            "3\t0/1",
        ] {
            assert!(TimelinePath::parse(3, text).is_err(), "{text:?}");
        }
    }
}
