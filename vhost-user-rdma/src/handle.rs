//! Generational handle tables: how the daemon names a VM's objects to that VM.
//!
//! A handle packs a slot index in its low bits and the slot's generation in the bits above.
//! Freeing a slot bumps its generation, so a handle kept after its object was destroyed, or one
//! a guest made up, names nothing. Handles never contain host pointers, and they are dense per
//! VM, which is what lets a VM's objects be recreated unchanged on another host.

use serde::{Deserialize, Serialize};

/// A table of objects named by generational handles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Table<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    index_bits: u32,
    generation_bits: u32,
    capacity: u32,
    live: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Table<T> {
    /// A table of at most `capacity` live objects whose handles use `index_bits` bits for the
    /// slot and `generation_bits` above them. Generations start at 1, so no handle is 0.
    pub fn new(capacity: u32, index_bits: u32, generation_bits: u32) -> Self {
        debug_assert!(index_bits + generation_bits <= 32);
        debug_assert!(u64::from(capacity) <= 1u64 << index_bits);
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            index_bits,
            generation_bits,
            capacity,
            live: 0,
        }
    }

    /// Objects alive.
    pub fn len(&self) -> u32 {
        self.live
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Stores `value` and returns its handle, or gives it back when the table is full.
    pub fn insert(&mut self, value: T) -> Result<u32, T> {
        if self.live >= self.capacity {
            return Err(value);
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = self.slots.len() as u32;
                self.slots.push(Slot {
                    generation: 1,
                    value: None,
                });
                i
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.value = Some(value);
        let generation = slot.generation;
        self.live += 1;
        Ok(self.compose(index, generation))
    }

    fn compose(&self, index: u32, generation: u32) -> u32 {
        (generation << self.index_bits) | index
    }

    fn split(&self, handle: u32) -> (usize, u32) {
        let index = handle & ((1u32 << self.index_bits) - 1);
        let generation = (handle >> self.index_bits) & self.generation_mask();
        (index as usize, generation)
    }

    fn generation_mask(&self) -> u32 {
        if self.generation_bits >= 32 {
            u32::MAX
        } else {
            (1u32 << self.generation_bits) - 1
        }
    }

    /// The object `handle` names, if it is alive and of the current generation.
    pub fn get(&self, handle: u32) -> Option<&T> {
        let (index, generation) = self.split(handle);
        let slot = self.slots.get(index)?;
        (slot.generation == generation && self.compose(index as u32, generation) == handle)
            .then_some(())?;
        slot.value.as_ref()
    }

    /// Mutable access to the object `handle` names.
    pub fn get_mut(&mut self, handle: u32) -> Option<&mut T> {
        let (index, generation) = self.split(handle);
        if self.compose(index as u32, generation) != handle {
            return None;
        }
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// Removes and returns the object `handle` names; its handle is never valid again until
    /// the generation counter wraps.
    pub fn remove(&mut self, handle: u32) -> Option<T> {
        self.get(handle)?;
        let (index, _) = self.split(handle);
        let mask = self.generation_mask();
        let slot = &mut self.slots[index];
        let value = slot.value.take();
        // Generation 0 is skipped so that no handle is ever 0.
        slot.generation = (slot.generation % mask) + 1;
        self.free.push(index as u32);
        self.live -= 1;
        value
    }

    /// Every live object with its handle.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.value
                .as_ref()
                .map(|v| (self.compose(i as u32, s.generation), v))
        })
    }

    /// Removes every object.
    pub fn drain(&mut self) -> Vec<(u32, T)> {
        let handles: Vec<u32> = self.iter().map(|(h, _)| h).collect();
        handles
            .into_iter()
            .filter_map(|h| self.remove(h).map(|v| (h, v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_forged_and_zero_handles_name_nothing() {
        let mut t = Table::new(4, 16, 8);
        let a = t.insert("a").unwrap();
        assert_ne!(a, 0);
        assert_eq!(t.get(a), Some(&"a"));
        assert_eq!(t.remove(a), Some("a"));
        let b = t.insert("b").unwrap();
        assert_ne!(a, b, "a reused slot must get a new generation");
        assert_eq!(t.get(a), None, "stale handle");
        assert_eq!(t.get(b), Some(&"b"));
        assert_eq!(t.get(0), None);
        assert_eq!(
            t.get(b | (1 << 30)),
            None,
            "bits above the generation are not ignored"
        );
        assert_eq!(t.get(b + 1), None, "a neighbouring index is not live");
        assert_eq!(t.remove(a), None);
    }

    #[test]
    fn capacity_is_enforced_and_freed_slots_come_back() {
        let mut t = Table::new(2, 16, 8);
        let a = t.insert(1).unwrap();
        t.insert(2).unwrap();
        assert_eq!(t.insert(3), Err(3));
        t.remove(a);
        assert!(t.insert(3).is_ok());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn generation_wraps_without_producing_zero() {
        let mut t = Table::new(1, 16, 2);
        let mut seen = Vec::new();
        for _ in 0..10 {
            let h = t.insert(()).unwrap();
            assert_ne!(h, 0);
            assert!(h >> 16 >= 1 && h >> 16 <= 3);
            seen.push(h);
            t.remove(h);
        }
        assert_eq!(
            seen[0], seen[3],
            "three generations, then the first comes back"
        );
    }
}
