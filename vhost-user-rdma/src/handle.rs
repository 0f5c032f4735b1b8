//! Generational handle tables: how the daemon names a VM's objects to that VM.
//!
//! A handle packs a slot index in its low bits and the slot's generation in the bits above.
//! Freeing a slot bumps its generation, so a handle kept after its object was destroyed, or one
//! a guest made up, names nothing. Handles never contain host pointers, and they are dense per
//! VM, which is what lets a VM's objects be recreated unchanged on another host.

/// Why a saved table cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// More slots than the handles' index bits can name.
    #[error("{0} slots, more than the handles can name")]
    TooManySlots(usize),
    /// A slot's generation is 0 or does not fit the handles' generation bits.
    #[error("slot {0} has generation {1}, which no handle can carry")]
    Generation(usize, u32),
    /// The free list names a slot that does not exist, is in use, or is listed twice.
    #[error("the free list names slot {0}, which is not a free slot, or twice")]
    FreeSlot(u32),
    /// An empty slot is missing from the free list, so it could never be reused.
    #[error("empty slot {0} is not on the free list")]
    LostSlot(usize),
    /// More live objects than the destination allows.
    #[error("{live} objects, over this VM's quota of {capacity}")]
    OverCapacity {
        /// Objects saved.
        live: u32,
        /// Quota here.
        capacity: u32,
    },
}

/// A table of objects named by generational handles.
#[derive(Debug, Clone)]
pub struct Table<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    index_bits: u32,
    generation_bits: u32,
    capacity: u32,
    live: u32,
}

#[derive(Debug, Clone)]
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

    /// Most objects alive at once (the quota).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Changes the quota (an operator did, at run time). Objects alive beyond a lower quota
    /// stay; no more are made until they are fewer than it. Capped at what the handles' index
    /// bits can name.
    pub fn set_capacity(&mut self, capacity: u32) {
        self.capacity =
            u32::try_from(u64::from(capacity).min(1u64 << self.index_bits)).unwrap_or(u32::MAX);
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

    /// Whether [`Table::place`] would store an object under `handle`: it is not 0, its
    /// generation fits, its slot is free and the table is not full.
    pub fn can_place(&self, handle: u32) -> bool {
        let (index, generation) = self.split(handle);
        handle != 0
            && self.live < self.capacity
            && self.compose(index as u32, generation) == handle
            && self.slots.get(index).is_none_or(|s| s.value.is_none())
    }

    /// Stores `value` under `handle`, chosen by someone else (the NIC's QP number on the
    /// verbs fabric), or gives it back if [`Table::can_place`] says no. The handle's low
    /// bits name the slot, so lookups stay as cheap as for handles the table chose.
    pub fn place(&mut self, handle: u32, value: T) -> Result<u32, T> {
        if !self.can_place(handle) {
            return Err(value);
        }
        let (index, generation) = self.split(handle);
        while self.slots.len() <= index {
            self.free.push(self.slots.len() as u32);
            self.slots.push(Slot {
                generation: 1,
                value: None,
            });
        }
        self.free.retain(|&f| f as usize != index);
        let slot = &mut self.slots[index];
        slot.generation = generation;
        slot.value = Some(value);
        self.live += 1;
        Ok(handle)
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

    /// The handle of the object that lives now in the slot `handle` names, whatever
    /// generation `handle` carries: for a handle kept from an earlier object of the slot,
    /// that object's successor.
    pub fn live_in_slot(&self, handle: u32) -> Option<u32> {
        let (index, _) = self.split(handle);
        let slot = self.slots.get(index)?;
        slot.value.as_ref()?;
        Some(self.compose(index as u32, slot.generation))
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

    /// The table as saved for migration: each slot's generation and object, in slot order,
    /// and the free slots in the order they will be reused. With [`Table::restore`] this
    /// gives the same handles for the same objects, and the same handles for the objects made
    /// next.
    pub fn slots(&self) -> (impl Iterator<Item = (u32, Option<&T>)>, &[u32]) {
        (
            self.slots.iter().map(|s| (s.generation, s.value.as_ref())),
            &self.free,
        )
    }

    /// Index bits and generation bits of the table's handles.
    pub fn handle_bits(&self) -> (u32, u32) {
        (self.index_bits, self.generation_bits)
    }

    /// Rebuilds a table saved with [`Table::slots`] into one made as `Table::new(capacity,
    /// index_bits, generation_bits)`, checking everything a corrupt or hostile save could get
    /// wrong: the slot count, each generation, and that the free list names each empty slot
    /// exactly once.
    pub fn restore(
        capacity: u32,
        index_bits: u32,
        generation_bits: u32,
        slots: Vec<(u32, Option<T>)>,
        free: Vec<u32>,
    ) -> Result<Self, RestoreError> {
        let mut table = Table::new(capacity, index_bits, generation_bits);
        if slots.len() as u64 > 1u64 << index_bits {
            return Err(RestoreError::TooManySlots(slots.len()));
        }
        let mask = table.generation_mask();
        let mut listed = vec![false; slots.len()];
        for &index in &free {
            let seen = listed
                .get_mut(index as usize)
                .ok_or(RestoreError::FreeSlot(index))?;
            if *seen || slots[index as usize].1.is_some() {
                return Err(RestoreError::FreeSlot(index));
            }
            *seen = true;
        }
        for (index, (generation, value)) in slots.into_iter().enumerate() {
            if generation == 0 || generation > mask {
                return Err(RestoreError::Generation(index, generation));
            }
            if value.is_none() && !listed[index] {
                return Err(RestoreError::LostSlot(index));
            }
            table.live += u32::from(value.is_some());
            table.slots.push(Slot { generation, value });
        }
        if table.live > capacity {
            return Err(RestoreError::OverCapacity {
                live: table.live,
                capacity,
            });
        }
        table.free = free;
        Ok(table)
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
    fn any_generation_of_a_slot_leads_to_the_object_living_there() {
        let mut t = Table::new(4, 16, 8);
        let a = t.insert("a").unwrap();
        assert_eq!(t.live_in_slot(a), Some(a));
        t.remove(a);
        assert_eq!(t.live_in_slot(a), None, "the slot is empty");
        let b = t.insert("b").unwrap();
        assert_eq!(
            t.live_in_slot(a),
            Some(b),
            "the old handle's slot holds b now"
        );
        assert_eq!(t.live_in_slot(b), Some(b));
        assert_eq!(
            t.live_in_slot(b + 1),
            None,
            "a neighbouring slot is not live"
        );
    }

    #[test]
    fn handles_chosen_elsewhere_are_placed_in_their_slot_once() {
        let mut t = Table::new(3, 16, 8);
        let a = t.insert("a").unwrap();
        // A NIC QP number: slot 0x0012, generation 0x34.
        assert_eq!(t.place(0x34_0012, "nic"), Ok(0x34_0012));
        assert_eq!(t.get(0x34_0012), Some(&"nic"));
        assert_eq!(t.get(0x35_0012), None, "another generation of the slot");
        assert!(!t.can_place(0x99_0012), "the slot is taken");
        assert!(!t.can_place(a), "a's slot is taken");
        assert!(!t.can_place(0), "0 names nothing");
        assert!(!t.can_place(1 << 24), "past the generation bits");
        // Generation 0 is a number like any other, as long as the handle is not 0.
        assert_eq!(t.place(0x0005, "low"), Ok(0x0005));
        assert_eq!(t.place(0x01_0007, "full"), Err("full"), "capacity holds");
        assert_eq!(t.remove(0x34_0012), Some("nic"));
        assert_eq!(t.place(0x01_0012, "again"), Ok(0x01_0012));
        // The slots skipped on the way are free for the table's own handles.
        t.remove(0x0005);
        let own = t.insert("own").unwrap();
        assert!(t.get(own).is_some() && own & 0xffff < 0x12, "{own:#x}");
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

    /// A saved table comes back with the same handles, stale handles stay stale, and the
    /// next objects get the handles they would have got on the source.
    #[test]
    fn a_restored_table_names_the_same_objects_and_allocates_the_same_next() {
        let mut t = Table::new(8, 16, 8);
        let a = t.insert("a").unwrap();
        let b = t.insert("b").unwrap();
        let c = t.insert("c").unwrap();
        t.remove(b);
        let (slots, free) = t.slots();
        let slots: Vec<(u32, Option<&str>)> = slots.map(|(g, v)| (g, v.copied())).collect();
        let mut r = Table::restore(8, 16, 8, slots.clone(), free.to_vec()).unwrap();
        assert_eq!(
            (r.get(a), r.get(b), r.get(c)),
            (Some(&"a"), None, Some(&"c"))
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r.insert("d"), t.insert("d"), "same next handle");

        let err = |slots: Vec<(u32, Option<&'static str>)>, free: Vec<u32>| {
            Table::restore(8, 16, 8, slots, free).unwrap_err()
        };
        assert_eq!(err(slots.clone(), vec![]), RestoreError::LostSlot(1));
        assert_eq!(err(slots.clone(), vec![1, 1]), RestoreError::FreeSlot(1));
        assert_eq!(err(slots.clone(), vec![0]), RestoreError::FreeSlot(0));
        assert_eq!(err(slots.clone(), vec![9]), RestoreError::FreeSlot(9));
        let mut bad = slots.clone();
        bad[0].0 = 0;
        assert_eq!(err(bad, vec![1]), RestoreError::Generation(0, 0));
        let mut bad = slots.clone();
        bad[2].0 = 256;
        assert_eq!(err(bad, vec![1]), RestoreError::Generation(2, 256));
        assert_eq!(
            Table::restore(1, 16, 8, slots, vec![1]).unwrap_err(),
            RestoreError::OverCapacity {
                live: 2,
                capacity: 1
            }
        );
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
