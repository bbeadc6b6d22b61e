//! Numbers that name things in a volume, each its own type so that one
//! cannot be passed for another.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl Add<u64> for $name {
            type Output = $name;
            fn add(self, n: u64) -> $name {
                $name(self.0 + n)
            }
        }

        impl AddAssign<u64> for $name {
            fn add_assign(&mut self, n: u64) {
                self.0 += n;
            }
        }

        /// How far apart two are.
        impl Sub for $name {
            type Output = u64;
            fn sub(self, other: $name) -> u64 {
                self.0 - other.0
            }
        }
    };
}

id!(
    /// A logical block address: block `n` of the volume, as the layer above
    /// sees it (not where it is stored).
    Lba
);
id!(
    /// A snapshot's id: never reused within a volume.
    SnapshotId
);
id!(
    /// A write generation: unique per sealed block, it is the block's XTS
    /// tweak and orders every write the volume ever made.
    Generation
);
id!(
    /// A segment of the log, numbered from the start of the data area.
    SegmentId
);
