//! Which node of a cluster the inside segment reaches a user's address
//! through: proxy ARP for the sessions held here, on-link /32 routes for the
//! sessions held by other nodes, gratuitous ARP when a session arrives.
//!
//! Every node routes its whole pool into its TUN device. With `proxy_arp`
//! on the inside interface the kernel answers ARP requests on the inside
//! segment for every address it routes out of a *different* interface: the
//! pool addresses. For a session held by another node, [`Announcer::add_remote`]
//! installs `<addr>/32 dev <inside> scope link`: the address is now routed
//! out of the interface the request came in on, so this node neither
//! answers ARP for it nor sends its packets into its own TUN; it ARPs for
//! it like any host, and the holder answers. When a session starts or moves
//! here, [`Announcer::announce_local`] sends a gratuitous ARP so that hosts
//! which cached another node's MAC for the address update it at once (Linux
//! updates an existing neighbour entry from a gratuitous ARP request even
//! with `arp_accept = 0`; it creates none).
//!
//! What the kernel needs besides: IPv4 forwarding on (`net.ipv4.ip_forward`
//! or the interface's `forwarding`): the kernel answers proxy ARP only on
//! interfaces that forward. Proxy replies to broadcast requests are delayed
//! by a random time up to `net.ipv4.neigh.<if>.proxy_delay` (0.8 s by
//! default); unicast re-validations are answered at once.
//!
//! Everything goes through netlink and a packet socket (no `ip` binary, no
//! `/proc/sys` write: `proxy_arp` is set with `RTM_SETLINK`, which works in
//! a container whose `/proc/sys` is read-only). Capabilities: `CAP_NET_ADMIN`
//! (routes, `proxy_arp`) and `CAP_NET_RAW` (the packet socket; Docker grants
//! it by default, Podman does not). The routes carry the protocol number
//! [`RTPROT_INTRAGATE`], so a new [`Announcer`] removes those left by an
//! earlier run (a crash), and [`Announcer::clear`] its own at shutdown.
//! Dropping an announcer leaves its routes in place; `proxy_arp` stays on
//! (without the TUN's pool route there is nothing left to answer for).
//!
//! IPv6 session addresses are not announced yet (that needs `proxy_ndp`,
//! a neighbour proxy entry per local address and unsolicited neighbour
//! advertisements): the calls accept them and do nothing.
//!
//! Every call blocks for one or two netlink round trips (microseconds; at
//! most [`NETLINK_TIMEOUT`] when the kernel does not answer).

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::socket::{
    self, sockopt, AddressFamily, LinkAddr, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType, SockaddrLike,
};
use nix::sys::time::TimeVal;

/// The route protocol (`rtm_protocol`) of the routes an [`Announcer`]
/// installs. The kernel gives no meaning to values above `RTPROT_STATIC`
/// (4); 201 is not among those `linux/rtnetlink.h` assigns (routing daemons
/// use 9–20, 42, 99 and 186–192). `ip route show proto 201` lists them;
/// `echo '201 intragate' > /etc/iproute2/rt_protos.d/intragate.conf` names
/// them.
pub const RTPROT_INTRAGATE: u8 = 201;

/// How long a netlink request may wait for the kernel's answer.
pub const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);

/// Receive buffer: the kernel fills a dump message up to 32 KiB
/// (`netlink_dump`, `max_recvmsg_len` capped at 32768).
const RECV_BUF: usize = 64 * 1024;

/// Announces, on one inside interface, which session addresses this node
/// holds (see the module documentation). Shareable between threads; the
/// calls are serialised.
pub struct Announcer {
    inside: String,
    ifindex: u32,
    mac: [u8; 6],
    packet: OwnedFd,
    /// Where gratuitous ARP goes: Ethernet broadcast out of `ifindex`.
    broadcast: LinkAddr,
    state: Mutex<State>,
}

/// What changes under the lock: the netlink socket (one request at a time,
/// so that answers are not interleaved) and the routes installed.
struct State {
    netlink: Netlink,
    remotes: BTreeSet<Ipv4Addr>,
}

impl fmt::Debug for Announcer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Announcer")
            .field("inside", &self.inside)
            .field("ifindex", &self.ifindex)
            .field("mac", &MacDisplay(self.mac))
            .field("remotes", &self.remote_count())
            .finish()
    }
}

impl Announcer {
    /// Opens the sockets for the interface `inside` (which must be an
    /// Ethernet-like interface of the calling thread's network namespace),
    /// enables `proxy_arp` on it and removes every route of protocol
    /// [`RTPROT_INTRAGATE`] left by an earlier run (in any table, through
    /// any interface).
    ///
    /// # Errors
    /// The interface does not exist or has no Ethernet address; a socket
    /// cannot be opened (needs `CAP_NET_ADMIN` for the changes, `CAP_NET_RAW`
    /// for the packet socket); the kernel refuses a change. Each error names
    /// the interface and what failed.
    pub fn new(inside: &str) -> io::Result<Announcer> {
        let (ifindex, mac) = ethernet_link(inside)?;
        let mut netlink = Netlink::open().map_err(|e| {
            context(
                e,
                format!("announcer for '{inside}': cannot open a netlink socket"),
            )
        })?;
        netlink
            .request(|seq| encode_proxy_arp(seq, ifindex))
            .map_err(|e| {
                let hint = privilege_hint(&e, "CAP_NET_ADMIN");
                context(e, format!("cannot enable proxy_arp on '{inside}'{hint}"))
            })?;
        let stale = netlink.dump_routes().map_err(|e| {
            context(
                e,
                format!("announcer for '{inside}': cannot list the routes"),
            )
        })?;
        let mut removed = 0usize;
        for route in stale.iter().filter(|r| r.protocol == RTPROT_INTRAGATE) {
            let deleted = netlink.request(|seq| encode_route(RTM_DELROUTE, REQ_ACK, seq, route));
            match deleted {
                Ok(()) => removed += 1,
                Err(e) if is_errno(&e, libc::ESRCH) => {}
                Err(e) => {
                    return Err(context(
                        e,
                        format!(
                            "announcer for '{inside}': cannot remove the route {route} \
                             left by an earlier run"
                        ),
                    ))
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                protocol = RTPROT_INTRAGATE,
                "removed routes left by an earlier run"
            );
        }
        let packet = open_packet_socket(ifindex).map_err(|e| {
            let hint = privilege_hint(&e, "CAP_NET_RAW");
            context(
                e,
                format!("cannot open a packet socket on '{inside}'{hint}"),
            )
        })?;
        let broadcast = link_addr(ifindex, ETH_P_ARP, BROADCAST_MAC)?;
        Ok(Announcer {
            inside: inside.to_owned(),
            ifindex,
            mac,
            packet,
            broadcast,
            state: Mutex::new(State {
                netlink,
                remotes: BTreeSet::new(),
            }),
        })
    }

    /// Another node holds `addr`: routes `addr/32` on-link out of the
    /// inside interface (replacing a route for the same prefix if there is
    /// one), so this node stops answering ARP for it and sends its packets
    /// to the holder. IPv6: does nothing (see the module documentation).
    ///
    /// # Errors
    /// The kernel refuses the route (the interface is down or gone, no
    /// `CAP_NET_ADMIN`); the error names the address and the interface.
    pub fn add_remote(&self, addr: IpAddr) -> io::Result<()> {
        let IpAddr::V4(v4) = addr else {
            return Ok(());
        };
        let route = Route::remote(v4, self.ifindex);
        let mut state = self.lock();
        state
            .netlink
            .request(|seq| {
                encode_route(
                    RTM_NEWROUTE,
                    REQ_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                    seq,
                    &route,
                )
            })
            .map_err(|e| context(e, format!("cannot route {v4}/32 out of '{}'", self.inside)))?;
        state.remotes.insert(v4);
        Ok(())
    }

    /// `addr` is no longer held by another node (or it is held here now):
    /// removes the route [`add_remote`](Self::add_remote) installed. A route
    /// that is not there is not an error. IPv6: does nothing.
    ///
    /// # Errors
    /// The kernel refuses the removal; the error names the address and the
    /// interface.
    pub fn remove_remote(&self, addr: IpAddr) -> io::Result<()> {
        let IpAddr::V4(v4) = addr else {
            return Ok(());
        };
        self.lock().remove(v4, self.ifindex, &self.inside)
    }

    /// This node holds `addr` now: sends one gratuitous ARP (a broadcast
    /// ARP request with sender and target address `addr` and the inside
    /// interface's MAC as sender) out of the inside interface. A route from
    /// [`add_remote`](Self::add_remote) for `addr` is removed first. Hosts
    /// may miss a single frame: callers repeat the call once or twice (say
    /// after a second) rather than this call sleeping. IPv6: does nothing.
    ///
    /// # Errors
    /// The frame cannot be sent (the interface is down or gone) or the
    /// route cannot be removed; the error names the address and the
    /// interface.
    pub fn announce_local(&self, addr: IpAddr) -> io::Result<()> {
        let IpAddr::V4(v4) = addr else {
            return Ok(());
        };
        {
            let mut state = self.lock();
            if state.remotes.contains(&v4) {
                state.remove(v4, self.ifindex, &self.inside)?;
            }
        }
        let frame = garp_frame(self.mac, v4);
        let sent = socket::sendto(
            self.packet.as_raw_fd(),
            &frame,
            &self.broadcast,
            MsgFlags::empty(),
        );
        match sent {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "gratuitous ARP for {v4} on '{}': sent {n} of {} bytes",
                self.inside,
                frame.len()
            ))),
            Err(e) => Err(context(
                io::Error::from(e),
                format!("cannot send gratuitous ARP for {v4} on '{}'", self.inside),
            )),
        }
    }

    /// Removes every route this announcer installed and still holds
    /// (shutdown). Goes on after a failure and returns the first one; the
    /// routes that could not be removed stay counted.
    ///
    /// # Errors
    /// The kernel refuses a removal; the error names the address.
    pub fn clear(&self) -> io::Result<()> {
        let mut state = self.lock();
        let mut first_err = None;
        let addrs: Vec<Ipv4Addr> = state.remotes.iter().copied().collect();
        for a in addrs {
            if let Err(e) = state.remove(a, self.ifindex, &self.inside) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// How many routes for other nodes' sessions this announcer has
    /// installed and not removed (as far as it knows: routes removed behind
    /// its back, e.g. when the interface went down, still count).
    pub fn remote_count(&self) -> usize {
        self.lock().remotes.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock panics; a poisoned lock still holds a
        // consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn remove(&mut self, addr: Ipv4Addr, ifindex: u32, inside: &str) -> io::Result<()> {
        let route = Route::remote(addr, ifindex);
        match self
            .netlink
            .request(|seq| encode_route(RTM_DELROUTE, REQ_ACK, seq, &route))
        {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::ESRCH) => {}
            Err(e) => {
                return Err(context(
                    e,
                    format!("cannot remove the route {addr}/32 out of '{inside}'"),
                ))
            }
        }
        self.remotes.remove(&addr);
        Ok(())
    }
}

/// " (needs CAP)" when `e` is a permission error.
fn privilege_hint(e: &io::Error, cap: &str) -> String {
    if e.kind() == io::ErrorKind::PermissionDenied {
        format!(" (needs {cap})")
    } else {
        String::new()
    }
}

/// `e` with `what` in front of its message, keeping its kind.
fn context(e: io::Error, what: impl fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

struct MacDisplay([u8; 6]);

impl fmt::Debug for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

/// The interface index and MAC of `name`, from `getifaddrs(3)` (its
/// `AF_PACKET` entry; it asks the kernel over netlink in the calling
/// thread's network namespace).
fn ethernet_link(name: &str) -> io::Result<(u32, [u8; 6])> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| {
        context(
            e.into(),
            format!("inside interface '{name}': cannot list the network interfaces"),
        )
    })?;
    for ifa in addrs.filter(|i| i.interface_name == name) {
        let Some(link) = ifa.address.as_ref().and_then(|a| a.as_link_addr()) else {
            continue;
        };
        if link.hatype() != ARPHRD_ETHER || link.halen() != 6 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "inside interface '{name}' is not an Ethernet interface (ARP hardware type {}): \
                     it cannot answer ARP",
                    link.hatype()
                ),
            ));
        }
        let (Ok(ifindex), Some(mac)) = (u32::try_from(link.ifindex()), link.addr()) else {
            continue;
        };
        return Ok((ifindex, mac));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("inside interface '{name}' not found"),
    ))
}

/// A packet socket for sending ARP frames out of `ifindex`. Opened with
/// protocol 0 and bound with protocol 0, so it receives nothing.
fn open_packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Packet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::bind(fd.as_raw_fd(), &link_addr(ifindex, 0, [0; 6])?)?;
    Ok(fd)
}

/// `sockaddr_ll` for `ifindex`, EtherType `protocol` (host order) and
/// destination `dest`.
fn link_addr(ifindex: u32, protocol: u16, dest: [u8; 6]) -> io::Result<LinkAddr> {
    let mut sll_addr = [0u8; 8];
    sll_addr[..6].copy_from_slice(&dest);
    let raw = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: protocol.to_be(),
        sll_ifindex: i32::try_from(ifindex).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "interface index out of range")
        })?,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr,
    };
    let len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `raw` is a fully initialised sockaddr_ll that outlives the
    // call, and `len` is its size: from_raw reads exactly that many bytes.
    let addr = unsafe { LinkAddr::from_raw((&raw as *const libc::sockaddr_ll).cast(), Some(len)) };
    addr.ok_or_else(|| io::Error::other("cannot build a link-layer address"))
}

/// A `NETLINK_ROUTE` socket and the sequence number of its last request.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let timeout = TimeVal::new(NETLINK_TIMEOUT.as_secs() as _, 0);
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        // The kernel's reason in text with each error, and no copy of our
        // request in it. Both optional (Linux 4.12 / 4.3).
        let _ = enable_netlink_option(&fd, NETLINK_EXT_ACK);
        let _ = enable_netlink_option(&fd, NETLINK_CAP_ACK);
        Ok(Netlink {
            fd,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let n = socket::send(self.fd.as_raw_fd(), msg, MsgFlags::empty())?;
        if n != msg.len() {
            return Err(io::Error::other(format!(
                "netlink: sent {n} of {} bytes",
                msg.len()
            )));
        }
        Ok(())
    }

    /// Receives one datagram from the kernel into `buf`; its length.
    /// Datagrams from other senders are dropped.
    fn recv(&mut self) -> io::Result<usize> {
        loop {
            let got = socket::recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), &mut self.buf);
            match got {
                Ok((n, from)) if from.is_none_or(|a| a.pid() == 0) => return Ok(n),
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from the kernel within {NETLINK_TIMEOUT:?}"),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends the request `build(seq)` (which asks for an ACK) and waits for
    /// its ACK; a negative one becomes the error.
    fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<()> {
        let seq = self.next_seq();
        self.send(&build(seq))?;
        loop {
            let n = self.recv()?;
            let buf = self.buf.get(..n).unwrap_or_default();
            for msg in messages(buf) {
                let (hdr, payload) = msg?;
                if hdr.seq != seq || hdr.kind != NLMSG_ERROR {
                    continue; // an answer to an earlier, timed-out request
                }
                return ack_result(&hdr, payload);
            }
        }
    }

    /// Every IPv4 and IPv6 route in every table (`RTM_GETROUTE` dump).
    fn dump_routes(&mut self) -> io::Result<Vec<Route>> {
        let seq = self.next_seq();
        self.send(&encode_route_dump(seq))?;
        let mut routes = Vec::new();
        loop {
            let n = self.recv()?;
            let buf = self.buf.get(..n).unwrap_or_default();
            for msg in messages(buf) {
                let (hdr, payload) = msg?;
                if hdr.seq != seq {
                    continue;
                }
                match hdr.kind {
                    NLMSG_DONE => {
                        // Its payload is an errno (0), absent before Linux 4.x.
                        if payload.len() >= 4 {
                            ack_result(&hdr, payload)?;
                        }
                        return Ok(routes);
                    }
                    NLMSG_ERROR => {
                        ack_result(&hdr, payload)?;
                        return Ok(routes);
                    }
                    RTM_NEWROUTE => routes.extend(parse_route(payload)),
                    _ => {}
                }
            }
        }
    }
}

/// Turns a `SOL_NETLINK` option on.
fn enable_netlink_option(fd: &OwnedFd, option: libc::c_int) -> io::Result<()> {
    crate::sockopt::set_int(fd.as_fd(), libc::SOL_NETLINK, option, 1)
}

// ---------------------------------------------------------------------------
// Messages: pure encoding and checked decoding (linux/netlink.h,
// linux/rtnetlink.h, linux/if_link.h, RFC 826).
// ---------------------------------------------------------------------------

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
/// In an ACK: the request is not copied into it (`NETLINK_CAP_ACK`).
const NLM_F_CAPPED: u16 = 0x100;
/// In an ACK: extended ACK attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const REQ_ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | 0x4000);

const RTM_SETLINK: u16 = 19;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTMSG_LEN: usize = 12;
const RT_TABLE_MAIN: u8 = 254;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;

const IFLA_AF_SPEC: u16 = 26;
const IFLA_INET_CONF: u16 = 1;
/// `IPV4_DEVCONF_PROXY_ARP` (linux/ip.h): the attribute type of the
/// `proxy_arp` setting inside `IFLA_INET_CONF`.
const IPV4_DEVCONF_PROXY_ARP: u16 = 3;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
const BROADCAST_MAC: [u8; 6] = [0xff; 6];
/// An ARP packet for IPv4 over Ethernet (RFC 826).
const ARP_LEN: usize = 28;

/// One route, as much of it as we install or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    family: u8,
    dst: Option<IpAddr>,
    dst_len: u8,
    tos: u8,
    table: u32,
    protocol: u8,
    scope: u8,
    kind: u8,
    oif: Option<u32>,
}

impl Route {
    /// `addr/32 dev <ifindex> scope link proto intragate`, table main.
    fn remote(addr: Ipv4Addr, ifindex: u32) -> Route {
        Route {
            family: AF_INET,
            dst: Some(IpAddr::V4(addr)),
            dst_len: 32,
            tos: 0,
            table: u32::from(RT_TABLE_MAIN),
            protocol: RTPROT_INTRAGATE,
            scope: RT_SCOPE_LINK,
            kind: RTN_UNICAST,
            oif: Some(ifindex),
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dst {
            Some(d) => write!(f, "{d}/{}", self.dst_len)?,
            None => write!(f, "default")?,
        }
        if let Some(oif) = self.oif {
            write!(f, " oif {oif}")?;
        }
        write!(f, " table {} proto {}", self.table, self.protocol)
    }
}

/// A netlink message being built: header, fixed part, attributes.
struct MsgBuilder(Vec<u8>);

impl MsgBuilder {
    fn new(kind: u16, flags: u16, seq: u32) -> MsgBuilder {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: to the kernel
        MsgBuilder(b)
    }

    fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let start = self.nest(kind);
        self.put(data);
        self.end(start);
    }

    /// Starts an attribute whose data follows; [`end`](Self::end) sets its
    /// length.
    fn nest(&mut self, kind: u16) -> usize {
        let start = self.0.len();
        self.put(&0u16.to_ne_bytes());
        self.put(&kind.to_ne_bytes());
        start
    }

    fn end(&mut self, start: usize) {
        // Our attributes are a few dozen bytes.
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// `RTM_NEWROUTE` / `RTM_DELROUTE` for `r`: `rtmsg`, then `RTA_TABLE` when
/// the table does not fit `rtm_table`, `RTA_DST`, `RTA_OIF`.
fn encode_route(kind: u16, flags: u16, seq: u32, r: &Route) -> Vec<u8> {
    let mut m = MsgBuilder::new(kind, flags, seq);
    let table = u8::try_from(r.table).unwrap_or(0); // RT_TABLE_UNSPEC + RTA_TABLE
    m.put(&[
        r.family, r.dst_len, 0, r.tos, table, r.protocol, r.scope, r.kind,
    ]);
    m.put(&0u32.to_ne_bytes()); // rtm_flags
    if u32::from(table) != r.table {
        m.attr(RTA_TABLE, &r.table.to_ne_bytes());
    }
    match r.dst {
        Some(IpAddr::V4(a)) => m.attr(RTA_DST, &a.octets()),
        Some(IpAddr::V6(a)) => m.attr(RTA_DST, &a.octets()),
        None => {}
    }
    if let Some(oif) = r.oif {
        m.attr(RTA_OIF, &oif.to_ne_bytes());
    }
    m.finish()
}

/// `RTM_GETROUTE` dump of every family and table.
fn encode_route_dump(seq: u32) -> Vec<u8> {
    let mut m = MsgBuilder::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq);
    m.put(&[0; RTMSG_LEN]);
    m.finish()
}

/// `RTM_SETLINK` of interface `ifindex` setting its IPv4 `proxy_arp` to 1:
/// `IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { IPV4_DEVCONF_PROXY_ARP: 1 } } }`
/// (what `sysctl net.ipv4.conf.<if>.proxy_arp=1` sets).
fn encode_proxy_arp(seq: u32, ifindex: u32) -> Vec<u8> {
    let mut m = MsgBuilder::new(RTM_SETLINK, REQ_ACK, seq);
    // ifinfomsg: family, pad, type, index, flags, change (no flag changed).
    m.put(&[0, 0]);
    m.put(&0u16.to_ne_bytes());
    m.put(&ifindex.to_ne_bytes());
    m.put(&0u32.to_ne_bytes());
    m.put(&0u32.to_ne_bytes());
    let af_spec = m.nest(IFLA_AF_SPEC | NLA_F_NESTED);
    let inet = m.nest(u16::from(AF_INET) | NLA_F_NESTED);
    let conf = m.nest(IFLA_INET_CONF | NLA_F_NESTED);
    m.attr(IPV4_DEVCONF_PROXY_ARP, &1u32.to_ne_bytes());
    m.end(conf);
    m.end(inet);
    m.end(af_spec);
    m.finish()
}

/// A gratuitous ARP (RFC 5227 §2.3 "ARP Announcement"): a request with
/// sender and target protocol address `addr`, sender hardware address
/// `mac`, target hardware address zero. The packet socket adds the
/// Ethernet header.
fn garp_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; ARP_LEN] {
    let mut f = [0u8; ARP_LEN];
    f[0..2].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    f[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[4] = 6;
    f[5] = 4;
    f[6..8].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    f[8..14].copy_from_slice(&mac);
    f[14..18].copy_from_slice(&addr.octets());
    // 18..24: target hardware address, zero.
    f[24..28].copy_from_slice(&addr.octets());
    f
}

/// A netlink message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NlHeader {
    kind: u16,
    flags: u16,
    seq: u32,
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink answer: {what}"),
    )
}

/// The messages of one datagram: header and payload each, an error for a
/// length that does not fit (and nothing after it).
fn messages(buf: &[u8]) -> impl Iterator<Item = io::Result<(NlHeader, &[u8])>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match first_message(rest) {
            Some((hdr, payload, len)) => {
                rest = rest.get(align4(len)..).unwrap_or_default();
                Some(Ok((hdr, payload)))
            }
            None => {
                rest = &[];
                Some(Err(malformed("message length")))
            }
        }
    })
}

/// The header, payload and length of the message at the start of `buf`.
fn first_message(buf: &[u8]) -> Option<(NlHeader, &[u8], usize)> {
    let len = ne_u32(buf, 0)? as usize;
    let hdr = NlHeader {
        kind: ne_u16(buf, 4)?,
        flags: ne_u16(buf, 6)?,
        seq: ne_u32(buf, 8)?,
    };
    let payload = buf.get(NLMSG_HDRLEN..len)?;
    Some((hdr, payload, len))
}

/// The attributes in `buf`: type (flags masked off) and data each; stops at
/// the first one whose length does not fit.
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let len = usize::from(ne_u16(rest, 0)?);
        let kind = ne_u16(rest, 2)? & NLA_TYPE_MASK;
        let data = rest.get(4..len)?;
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some((kind, data))
    })
}

/// An `NLMSG_ERROR` message: `Ok` for an ACK (error 0), else the error with
/// the kernel's text (extended ACK) when it sent one.
fn ack_result(hdr: &NlHeader, payload: &[u8]) -> io::Result<()> {
    let errno = ne_u32(payload, 0).ok_or_else(|| malformed("short error message"))? as i32;
    if errno == 0 {
        return Ok(());
    }
    let os = io::Error::from_raw_os_error(errno.saturating_neg());
    let Some(text) = ack_message(hdr, payload) else {
        return Err(os);
    };
    Err(io::Error::new(os.kind(), ExtAckError { os, text }))
}

/// The `NLMSGERR_ATTR_MSG` text of an extended ACK.
fn ack_message(hdr: &NlHeader, payload: &[u8]) -> Option<String> {
    if hdr.flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // error (4), then the request's header, then (unless capped) its payload.
    let request_len = if hdr.flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        ne_u32(payload, 4)? as usize
    };
    let tlvs = payload.get(align4(4 + request_len)..)?;
    let (_, text) = attributes(tlvs).find(|(k, _)| *k == NLMSGERR_ATTR_MSG)?;
    let text = text.split(|b| *b == 0).next().unwrap_or_default();
    Some(String::from_utf8_lossy(text).into_owned()).filter(|t| !t.is_empty())
}

/// A kernel error with the kernel's explanation.
#[derive(Debug)]
struct ExtAckError {
    os: io::Error,
    text: String,
}

impl fmt::Display for ExtAckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.os, self.text)
    }
}

impl std::error::Error for ExtAckError {}

/// Whether `e` is the kernel's `errno`, with or without its explanation.
fn is_errno(e: &io::Error, errno: i32) -> bool {
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<ExtAckError>())
        .and_then(|x| x.os.raw_os_error());
    e.raw_os_error().or(inner) == Some(errno)
}

/// The route in an `RTM_NEWROUTE` payload (IPv4 and IPv6 only).
fn parse_route(payload: &[u8]) -> Option<Route> {
    let rtm = payload.get(..RTMSG_LEN)?;
    let family = rtm[0];
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let mut r = Route {
        family,
        dst: None,
        dst_len: rtm[1],
        tos: rtm[3],
        table: u32::from(rtm[4]),
        protocol: rtm[5],
        scope: rtm[6],
        kind: rtm[7],
        oif: None,
    };
    for (kind, data) in attributes(payload.get(RTMSG_LEN..)?) {
        match kind {
            RTA_TABLE => r.table = ne_u32(data, 0)?,
            RTA_OIF => r.oif = Some(ne_u32(data, 0)?),
            RTA_DST => {
                r.dst = Some(match (family, data.len()) {
                    (AF_INET, 4) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?)),
                    (AF_INET6, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(data).ok()?)),
                    _ => return None,
                })
            }
            _ => {}
        }
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_libc() {
        assert_eq!(RTM_NEWROUTE, libc::RTM_NEWROUTE);
        assert_eq!(RTM_DELROUTE, libc::RTM_DELROUTE);
        assert_eq!(RTM_GETROUTE, libc::RTM_GETROUTE);
        assert_eq!(RTM_SETLINK, libc::RTM_SETLINK);
        assert_eq!(i32::from(NLM_F_REQUEST), libc::NLM_F_REQUEST);
        assert_eq!(i32::from(NLM_F_ACK), libc::NLM_F_ACK);
        assert_eq!(i32::from(NLM_F_DUMP), libc::NLM_F_DUMP);
        assert_eq!(i32::from(NLM_F_REPLACE), libc::NLM_F_REPLACE);
        assert_eq!(i32::from(NLM_F_CREATE), libc::NLM_F_CREATE);
        assert_eq!(i32::from(NLM_F_CAPPED), libc::NLM_F_CAPPED);
        assert_eq!(i32::from(NLM_F_ACK_TLVS), libc::NLM_F_ACK_TLVS);
        assert_eq!(i32::from(NLMSG_ERROR), libc::NLMSG_ERROR);
        assert_eq!(i32::from(NLMSG_DONE), libc::NLMSG_DONE);
        assert_eq!(NETLINK_CAP_ACK, libc::NETLINK_CAP_ACK);
        assert_eq!(NETLINK_EXT_ACK, libc::NETLINK_EXT_ACK);
        assert_eq!(i32::from(NLA_F_NESTED), libc::NLA_F_NESTED);
        assert_eq!(RT_TABLE_MAIN, libc::RT_TABLE_MAIN);
        assert_eq!(RT_SCOPE_LINK, libc::RT_SCOPE_LINK);
        assert_eq!(RTN_UNICAST, libc::RTN_UNICAST);
        assert_eq!(RTA_DST, libc::RTA_DST);
        assert_eq!(RTA_OIF, libc::RTA_OIF);
        assert_eq!(RTA_TABLE, libc::RTA_TABLE);
        assert_eq!(i32::from(ETH_P_ARP), libc::ETH_P_ARP);
        assert_eq!(i32::from(ETH_P_IP), libc::ETH_P_IP);
        assert_eq!(ARPHRD_ETHER, libc::ARPHRD_ETHER);
        const { assert!(RTPROT_INTRAGATE > libc::RTPROT_STATIC) };
        assert_eq!(size_of::<libc::nlmsghdr>(), NLMSG_HDRLEN);
        assert_eq!(size_of::<libc::ifinfomsg>(), 16);
    }

    // Netlink headers and attributes are in host byte order; the expected
    // bytes below are those of a little-endian host.
    #[cfg(target_endian = "little")]
    #[test]
    fn new_route_message_is_what_ip_route_replace_sends() {
        // ip route replace 198.19.77.10/32 dev <ifindex 7> scope link proto 201
        let r = Route::remote(Ipv4Addr::new(198, 19, 77, 10), 7);
        let m = encode_route(
            RTM_NEWROUTE,
            REQ_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            0x0102_0304,
            &r,
        );
        #[rustfmt::skip]
        let want: [u8; 44] = [
            44, 0, 0, 0,          // nlmsg_len
            24, 0,                // RTM_NEWROUTE
            0x05, 0x05,           // REQUEST|ACK|REPLACE|CREATE = 0x505
            4, 3, 2, 1,           // seq
            0, 0, 0, 0,           // pid
            2,                    // rtm_family AF_INET
            32, 0, 0,             // dst_len, src_len, tos
            254,                  // RT_TABLE_MAIN
            201,                  // protocol
            253,                  // RT_SCOPE_LINK
            1,                    // RTN_UNICAST
            0, 0, 0, 0,           // rtm_flags
            8, 0, 1, 0,           // RTA_DST, 4 bytes
            198, 19, 77, 10,
            8, 0, 4, 0,           // RTA_OIF, 4 bytes
            7, 0, 0, 0,
        ];
        assert_eq!(m, want);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn delete_route_message_names_our_protocol_scope_and_interface() {
        let r = Route::remote(Ipv4Addr::new(198, 19, 77, 10), 7);
        let m = encode_route(RTM_DELROUTE, REQ_ACK, 9, &r);
        assert_eq!(m.len(), 44);
        assert_eq!(
            &m[..16],
            &[44, 0, 0, 0, 25, 0, 5, 0, 9, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&m[16..24], &[2, 32, 0, 0, 254, 201, 253, 1]);
        assert_eq!(
            &m[28..44],
            &[8, 0, 1, 0, 198, 19, 77, 10, 8, 0, 4, 0, 7, 0, 0, 0]
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn a_table_above_255_goes_in_rta_table() {
        let r = Route {
            table: 1000,
            ..Route::remote(Ipv4Addr::new(198, 18, 0, 1), 3)
        };
        let m = encode_route(RTM_DELROUTE, REQ_ACK, 1, &r);
        assert_eq!(m[20], 0, "rtm_table = RT_TABLE_UNSPEC");
        assert_eq!(&m[28..36], &[8, 0, 15, 0, 0xe8, 0x03, 0, 0]);
        assert_eq!(m.len(), 52);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn route_dump_request() {
        #[rustfmt::skip]
        let want: [u8; 28] = [
            28, 0, 0, 0, 26, 0, 0x01, 0x03, 5, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // rtmsg, AF_UNSPEC
        ];
        assert_eq!(encode_route_dump(5), want);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn proxy_arp_message_nests_inet_conf_in_af_spec() {
        #[rustfmt::skip]
        let want: [u8; 52] = [
            52, 0, 0, 0, 19, 0, 5, 0, 2, 0, 0, 0, 0, 0, 0, 0, // RTM_SETLINK, REQUEST|ACK
            0, 0, 0, 0,           // ifi_family AF_UNSPEC, pad, ifi_type
            7, 0, 0, 0,           // ifi_index
            0, 0, 0, 0,           // ifi_flags
            0, 0, 0, 0,           // ifi_change
            20, 0, 26, 0x80,      // IFLA_AF_SPEC | NLA_F_NESTED
            16, 0, 2, 0x80,       //   AF_INET | NLA_F_NESTED
            12, 0, 1, 0x80,       //     IFLA_INET_CONF | NLA_F_NESTED
            8, 0, 3, 0,           //       IPV4_DEVCONF_PROXY_ARP
            1, 0, 0, 0,           //       = 1
        ];
        assert_eq!(encode_proxy_arp(2, 7), want);
    }

    #[test]
    fn gratuitous_arp_is_an_announcement_request() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        #[rustfmt::skip]
        let want: [u8; 28] = [
            0, 1,                   // htype Ethernet
            8, 0,                   // ptype IPv4
            6, 4,                   // hlen, plen
            0, 1,                   // request
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55, // sender MAC
            198, 19, 77, 10,        // sender IP
            0, 0, 0, 0, 0, 0,       // target MAC: zero (RFC 5227)
            198, 19, 77, 10,        // target IP = sender IP
        ];
        assert_eq!(garp_frame(mac, Ipv4Addr::new(198, 19, 77, 10)), want);
    }

    #[test]
    fn encoded_routes_parse_back() {
        let routes = [
            Route::remote(Ipv4Addr::new(198, 19, 77, 10), 7),
            Route {
                table: 4242,
                ..Route::remote(Ipv4Addr::new(198, 18, 0, 1), 1)
            },
            Route {
                family: AF_INET6,
                dst: Some("2001:db8::5".parse().expect("v6")),
                dst_len: 128,
                oif: None,
                ..Route::remote(Ipv4Addr::UNSPECIFIED, 0)
            },
            Route {
                dst: None,
                dst_len: 0,
                ..Route::remote(Ipv4Addr::UNSPECIFIED, 2)
            },
        ];
        for r in routes {
            let m = encode_route(RTM_NEWROUTE, NLM_F_REQUEST, 1, &r);
            let got: Vec<_> = messages(&m).collect::<io::Result<_>>().expect("parse");
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].0.kind, RTM_NEWROUTE);
            assert_eq!(parse_route(got[0].1), Some(r));
        }
    }

    fn error_msg(seq: u32, errno: i32, flags: u16, tail: &[u8]) -> Vec<u8> {
        let mut m = MsgBuilder::new(NLMSG_ERROR, flags, seq);
        m.put(&errno.to_ne_bytes());
        // The request's header (capped: no payload).
        m.put(&MsgBuilder::new(RTM_NEWROUTE, REQ_ACK, seq).finish());
        m.put(tail);
        m.finish()
    }

    #[test]
    fn acks_and_errors_decode() {
        let mut buf = error_msg(3, 0, 0, &[]);
        buf.extend(error_msg(4, -libc::ESRCH, 0, &[]));
        let mut text = MsgBuilder(Vec::new());
        text.attr(NLMSGERR_ATTR_MSG, b"Nexthop device is not up\0");
        buf.extend(error_msg(
            5,
            -libc::ENETDOWN,
            NLM_F_CAPPED | NLM_F_ACK_TLVS,
            &text.0,
        ));
        let got: Vec<_> = messages(&buf).collect::<io::Result<_>>().expect("parse");
        assert_eq!(got.len(), 3);
        let seqs: Vec<u32> = got.iter().map(|(h, _)| h.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert!(ack_result(&got[0].0, got[0].1).is_ok());
        let e = ack_result(&got[1].0, got[1].1).expect_err("ESRCH");
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
        let e = ack_result(&got[2].0, got[2].1).expect_err("ENETDOWN");
        assert!(e.to_string().contains("Nexthop device is not up"), "{e}");
        assert!(is_errno(&e, libc::ENETDOWN));
        assert!(is_errno(
            &io::Error::from_raw_os_error(libc::ESRCH),
            libc::ESRCH
        ));
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let m = encode_route(
            RTM_NEWROUTE,
            REQ_ACK,
            1,
            &Route::remote(Ipv4Addr::LOCALHOST, 1),
        );
        for cut in 0..m.len() {
            let part = &m[..cut];
            for (_, payload) in messages(part).flatten() {
                let _ = parse_route(payload);
            }
        }
        // A length field pointing past the end.
        let mut bad = m.clone();
        bad[0] = 200;
        assert!(messages(&bad).next().is_some_and(|r| r.is_err()));
        // An error message too short for its errno.
        let h = NlHeader {
            kind: NLMSG_ERROR,
            flags: NLM_F_ACK_TLVS,
            seq: 1,
        };
        assert!(ack_result(&h, &[1, 2]).is_err());
        assert!(ack_result(&h, &[0xff, 0xff, 0xff, 0xff, 200, 0, 0]).is_err());
    }

    #[test]
    fn unknown_interface_is_named() {
        let e = Announcer::new("igt-nosuch0").expect_err("no such interface");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("'igt-nosuch0'"), "{e}");
    }

    #[test]
    fn loopback_is_not_ethernet() {
        let e = Announcer::new("lo").expect_err("lo");
        assert!(e.to_string().contains("not an Ethernet"), "{e}");
    }
}
