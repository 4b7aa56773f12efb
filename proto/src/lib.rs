//! weft-proto: the wire. Generated KDS code (`kds::v1`) and data-plane API code
//! (`dataplane::v1`), conversions between wire and
//! `weft-core` types, and the stream drivers both ends of a KDS stream share.

pub mod convert;
pub mod driver;

/// Generated from `proto/weft/kds/v1/kds.proto`.
pub mod kds {
    pub mod v1 {
        tonic::include_proto!("weft.kds.v1");
    }
}

/// Generated from `proto/weft/dataplane/v1/dataplane.proto`: the data-plane API between
/// weft-dp and weft-zone.
pub mod dataplane {
    pub mod v1 {
        tonic::include_proto!("weft.dataplane.v1");
    }
}
