pub mod mock_apiserver;
