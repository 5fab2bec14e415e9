//! The connection driver's registry: which devices are connected (their
//! latest connection), which wait for an assignment, and which connection
//! each update being read arrives on. A leaf owns this; nothing in it is
//! state a crash could lose, since devices reconnect and check in again.

use super::*;

#[derive(Default)]
pub(super) struct Devices {
    /// Check-ins waiting for a task, an evaluation or the run's end.
    waiters: HashMap<Pseudonym, (u64, oneshot::Sender<Assignment>)>,
    /// The latest connection of each connected device.
    live: HashMap<Pseudonym, (u64, quinn::Connection)>,
    /// The connection each update being read arrives on.
    uploads: HashMap<Pseudonym, u64>,
}

impl Devices {
    /// Records `client`'s newest connection and closes any older one. True
    /// when an upload was riding on the connection it replaced.
    pub(super) fn connected(
        &mut self,
        client: Pseudonym,
        conn: u64,
        handle: quinn::Connection,
    ) -> bool {
        let Some((old, old_handle)) = self.live.insert(client, (conn, handle)) else {
            return false;
        };
        if old == conn {
            return false;
        }
        // A device reconnects when it lost its link; whatever the old
        // connection was doing is over.
        close(
            &old_handle,
            CloseCode::Superseded,
            "replaced by a newer connection",
        );
        if self.uploads.get(&client) == Some(&old) {
            self.uploads.remove(&client);
            return true;
        }
        false
    }

    /// Forgets `client` if `conn` is still its latest connection; false
    /// for a superseded connection's late goodbye.
    pub(super) fn disconnected(&mut self, client: Pseudonym, conn: u64) -> bool {
        if self.live.get(&client).map(|(id, _)| *id) != Some(conn) {
            return false;
        }
        self.live.remove(&client);
        self.waiters.remove(&client);
        true
    }

    pub(super) fn wait(
        &mut self,
        client: Pseudonym,
        conn: u64,
        reply: oneshot::Sender<Assignment>,
    ) {
        self.waiters.insert(client, (conn, reply));
    }

    /// Hands a waiting device its assignment; false if it was not waiting
    /// or has gone.
    pub(super) fn assign(&mut self, client: Pseudonym, assignment: Assignment) -> bool {
        self.waiters
            .remove(&client)
            .is_some_and(|(_, tx)| tx.send(assignment).is_ok())
    }

    /// Every waiting device, taken out of the queue.
    pub(super) fn take_waiting(
        &mut self,
    ) -> impl Iterator<Item = (Pseudonym, oneshot::Sender<Assignment>)> + use<> {
        std::mem::take(&mut self.waiters)
            .into_iter()
            .map(|(client, (_, tx))| (client, tx))
    }

    pub(super) fn has_waiting(&self) -> bool {
        !self.waiters.is_empty()
    }

    pub(super) fn begin_upload(&mut self, client: Pseudonym, conn: u64) {
        self.uploads.insert(client, conn);
    }

    /// Ends `client`'s upload on `conn`; false when that connection was
    /// superseded and its upload already written off.
    pub(super) fn end_upload(&mut self, client: Pseudonym, conn: u64) -> bool {
        if self.uploads.get(&client) != Some(&conn) {
            return false;
        }
        self.uploads.remove(&client);
        true
    }

    /// Closes `client`'s connection, if it has one.
    pub(super) fn close(&self, client: &Pseudonym, code: CloseCode, reason: &str) {
        if let Some((_, conn)) = self.live.get(client) {
            close(conn, code, reason);
        }
    }

    pub(super) fn connected_count(&self) -> usize {
        self.live.len()
    }
}
