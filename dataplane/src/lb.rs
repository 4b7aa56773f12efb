//! Endpoint selection: round robin or least-request, with passive health (endpoints that
//! refuse connections are ejected for a while).
