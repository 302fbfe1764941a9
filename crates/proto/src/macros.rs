//! Socket lookup shorthands for the engine's application-facing calls.

/// The application's socket `$id`, or `$err` when it does not exist or was closed.
macro_rules! socket_mut {
    ($self:ident, $id:expr, $err:expr) => {
        $self.sockets.get_mut(&$id).filter(|s| !s.orphan).ok_or($err)?
    };
}

/// Shared-reference form of `socket_mut!`.
macro_rules! socket_ref {
    ($self:ident, $id:expr, $err:expr) => {
        $self.sockets.get(&$id).filter(|s| !s.orphan).ok_or($err)?
    };
}
